//! Lossless encoders for 16-bit grayscale frames that dicom-rs can read but not write:
//! DICOM RLE Lossless (PS3.5 Annex G) and JPEG Lossless Process 14, first-order prediction
//! (ITU T.81 Annex H). JPEG 2000 goes through OpenJPEG (see `j2k`).
//!
//! Both are checked by decoding with dicom-rs (and pydicom in the e2e suite): a phantom that
//! does not round-trip exactly is a bug here.

/// RLE Lossless: two PackBits segments (high bytes, then low bytes), each row encoded
/// separately, each segment padded to even length, behind the 64-byte RLE header.
pub fn rle_encode_u16(samples: &[u16], columns: usize) -> Vec<u8> {
    let mut segments: Vec<Vec<u8>> = Vec::with_capacity(2);
    for shift in [8u32, 0] {
        let mut segment = Vec::with_capacity(samples.len() / 2);
        let mut row_bytes = Vec::with_capacity(columns);
        for row in samples.chunks(columns) {
            row_bytes.clear();
            row_bytes.extend(row.iter().map(|s| (s >> shift) as u8));
            packbits(&row_bytes, &mut segment);
        }
        if segment.len() % 2 == 1 {
            segment.push(0);
        }
        segments.push(segment);
    }
    let mut out = Vec::with_capacity(64 + segments.iter().map(Vec::len).sum::<usize>());
    out.extend((segments.len() as u32).to_le_bytes());
    let mut offset = 64u32;
    for i in 0..15 {
        if let Some(segment) = segments.get(i) {
            out.extend(offset.to_le_bytes());
            offset += segment.len() as u32;
        } else {
            out.extend(0u32.to_le_bytes());
        }
    }
    for segment in segments {
        out.extend(segment);
    }
    out
}

/// PackBits: runs of 2..=128 equal bytes as `(-(n-1), byte)`, literals of 1..=128 bytes as
/// `(n-1, bytes...)`.
fn packbits(data: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < data.len() {
        let mut run = 1;
        while i + run < data.len() && run < 128 && data[i + run] == data[i] {
            run += 1;
        }
        if run >= 2 {
            out.push((1i16 - run as i16) as i8 as u8);
            out.push(data[i]);
            i += run;
            continue;
        }
        let start = i;
        while i < data.len() && i - start < 128 {
            if i + 1 < data.len() && data[i + 1] == data[i] {
                break;
            }
            i += 1;
        }
        out.push((i - start - 1) as u8);
        out.extend_from_slice(&data[start..i]);
    }
}

/// JPEG Lossless (SOF3), one component, predictor 1, point transform 0, with a Huffman table
/// whose shortest codes go to the most frequent difference categories of this image.
pub fn jpeg_lossless_encode_u16(
    samples: &[u16],
    rows: usize,
    columns: usize,
    precision: u8,
) -> Vec<u8> {
    assert!((2..=16).contains(&precision), "precision 2..=16");
    assert_eq!(samples.len(), rows * columns);
    let mask: u32 = if precision == 16 {
        0xffff
    } else {
        (1 << precision) - 1
    };
    let diffs: Vec<i32> = (0..samples.len())
        .map(|i| {
            let (y, x) = (i / columns, i % columns);
            let predicted = if y == 0 && x == 0 {
                1i32 << (precision - 1)
            } else if y == 0 || x > 0 {
                i32::from(samples[i - 1])
            } else {
                i32::from(samples[i - columns])
            };
            let raw = (i32::from(samples[i]) - predicted).rem_euclid(65536);
            if raw > 32768 { raw - 65536 } else { raw }
        })
        .collect();
    let category = |d: i32| -> usize { (32 - d.unsigned_abs().leading_zeros()) as usize };
    let mut counts = [0u64; 17];
    for &d in &diffs {
        counts[category(d)] += 1;
    }
    // Lengths handed out in order of frequency; Kraft sum < 1 and no all-ones code.
    const LENGTHS: [u8; 17] = [2, 3, 3, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
    let mut order: Vec<usize> = (0..17).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(counts[c]), c));
    let mut length_of = [0u8; 17];
    for (rank, &c) in order.iter().enumerate() {
        length_of[c] = LENGTHS[rank];
    }
    // Canonical codes (T.81 Annex C): symbols listed by increasing length.
    let mut huffval: Vec<usize> = (0..17).collect();
    huffval.sort_by_key(|&c| (length_of[c], c));
    let mut bits = [0u8; 16];
    for &c in &huffval {
        bits[usize::from(length_of[c]) - 1] += 1;
    }
    let mut code_of = [0u16; 17];
    let mut code = 0u16;
    let mut k = 0;
    for length in 1..=16u8 {
        while k < huffval.len() && length_of[huffval[k]] == length {
            code_of[huffval[k]] = code;
            code += 1;
            k += 1;
        }
        code <<= 1;
    }

    let mut out = Vec::with_capacity(samples.len());
    out.extend([0xFF, 0xD8]);
    // SOF3
    out.extend([0xFF, 0xC3, 0x00, 0x0B, precision]);
    out.extend((rows as u16).to_be_bytes());
    out.extend((columns as u16).to_be_bytes());
    out.extend([0x01, 0x01, 0x11, 0x00]);
    // DHT
    let dht_len = 2 + 1 + 16 + huffval.len();
    out.extend([0xFF, 0xC4]);
    out.extend((dht_len as u16).to_be_bytes());
    out.push(0x00);
    out.extend(bits);
    out.extend(huffval.iter().map(|&c| c as u8));
    // SOS: one component, table 0, predictor 1, Se 0, Ah/Al 0.
    out.extend([0xFF, 0xDA, 0x00, 0x08, 0x01, 0x01, 0x00, 0x01, 0x00, 0x00]);

    let mut writer = BitWriter::new(&mut out);
    for &d in &diffs {
        let c = category(d);
        writer.put(u32::from(code_of[c]), length_of[c]);
        if c > 0 && c < 16 {
            let extra = if d > 0 {
                d as u32
            } else {
                (d - 1) as u32 & ((1 << c) - 1)
            };
            writer.put(extra & ((1 << c) - 1), c as u8);
        }
    }
    writer.finish();
    out.extend([0xFF, 0xD9]);
    let _ = mask;
    out
}

struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    filled: u8,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        BitWriter {
            out,
            acc: 0,
            filled: 0,
        }
    }

    fn put(&mut self, value: u32, bits: u8) {
        self.acc = (self.acc << bits) | u64::from(value);
        self.filled += bits;
        while self.filled >= 8 {
            self.filled -= 8;
            let byte = (self.acc >> self.filled) as u8;
            self.out.push(byte);
            if byte == 0xFF {
                self.out.push(0x00);
            }
        }
        self.acc &= (1u64 << self.filled) - 1;
    }

    fn finish(&mut self) {
        if self.filled > 0 {
            let pad = 8 - self.filled;
            self.put((1 << pad) - 1, pad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packbits_round_trip() {
        fn unpack(data: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < data.len() {
                let n = data[i] as i8;
                i += 1;
                if n >= 0 {
                    let len = n as usize + 1;
                    out.extend_from_slice(&data[i..i + len]);
                    i += len;
                } else if n != -128 {
                    out.extend(std::iter::repeat_n(data[i], (1 - n as i16) as usize));
                    i += 1;
                }
            }
            out
        }
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![7],
            vec![1, 1],
            vec![1, 2, 3, 3, 3, 4],
            (0..300).map(|i| (i / 7) as u8).collect(),
            vec![9; 300],
            (0..300).map(|i| (i * 31 % 251) as u8).collect(),
        ];
        for case in cases {
            let mut packed = Vec::new();
            packbits(&case, &mut packed);
            assert_eq!(unpack(&packed), case);
        }
    }
}
