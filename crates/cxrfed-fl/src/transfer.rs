//! Weights in chunks: the one assembly of a chunked transfer, for both directions. A node
//! assembles the global weights (or a promoted model) in memory; the coordinator spools each
//! site's update to a file. Either way a chunk must come from the transfer's sender, at the
//! next offset, within the announced size (or the cap), and the running SHA-256 is ready when
//! the last byte is in, so nothing is read twice.

use std::io::Write;

use sha2::{Digest, Sha256};

/// One transfer being assembled into `sink`.
#[derive(Debug)]
pub struct Assembly<W> {
    sender: String,
    sink: W,
    len: u64,
    announced: Option<u64>,
    max: u64,
    hasher: Sha256,
    broken: Option<String>,
}

impl<W: Write> Assembly<W> {
    /// A transfer from `sender` into `sink`, of `announced` bytes when the sender said so, and
    /// never more than `max`.
    pub fn new(sender: impl Into<String>, sink: W, announced: Option<u64>, max: u64) -> Self {
        let broken = announced
            .filter(|n| *n > max)
            .map(|n| format!("the transfer announces {n} bytes, more than the {max} allowed"));
        Assembly {
            sender: sender.into(),
            sink,
            len: 0,
            announced,
            max,
            hasher: Sha256::new(),
            broken,
        }
    }

    /// Marks the transfer unusable (the first reason is kept).
    pub fn fail(&mut self, reason: impl Into<String>) {
        if self.broken.is_none() {
            self.broken = Some(reason.into());
        }
    }

    /// Appends a chunk from `sender` at `offset`. A chunk that breaks a rule breaks the
    /// transfer; later chunks are ignored.
    pub fn push(&mut self, sender: &str, offset: u64, data: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let limit = self.announced.unwrap_or(self.max).min(self.max);
        if sender != self.sender {
            self.fail(format!(
                "{sender} sent chunks of {}'s transfer",
                self.sender
            ));
        } else if offset != self.len {
            self.fail(format!(
                "chunk at offset {offset} where {} was expected",
                self.len
            ));
        } else if self.len + data.len() as u64 > limit {
            self.fail(match self.announced {
                Some(n) if n <= self.max => format!("more than the {n} bytes announced"),
                _ => format!("the transfer is larger than {} bytes", self.max),
            });
        } else {
            match self.sink.write_all(data) {
                Ok(()) => {
                    self.hasher.update(data);
                    self.len += data.len() as u64;
                }
                Err(e) => self.fail(format!("cannot keep the transfer: {e}")),
            }
        }
    }

    /// Bytes taken so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// Why the transfer cannot be used: a broken rule, or fewer bytes than announced.
    pub fn problem(&self) -> Option<String> {
        self.broken.clone().or_else(|| {
            self.announced
                .filter(|n| *n != self.len)
                .map(|n| format!("{} bytes arrived of {n}", self.len))
        })
    }

    /// The SHA-256 (hex) of the bytes taken so far.
    pub fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// The sink (flushed), with the length and SHA-256 of what it holds.
    pub fn finish(mut self) -> Result<(W, u64, String), String> {
        if let Some(problem) = self.problem() {
            return Err(problem);
        }
        self.sink
            .flush()
            .map_err(|e| format!("cannot keep the transfer: {e}"))?;
        let sha = self.sha256();
        Ok((self.sink, self.len, sha))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_chunks_from_the_sender_assemble_with_their_hash() {
        let mut a = Assembly::new("coordinator", Vec::new(), Some(6), 100);
        a.push("coordinator", 0, b"abc");
        assert_eq!(a.problem().as_deref(), Some("3 bytes arrived of 6"));
        a.push("coordinator", 3, b"def");
        let (bytes, len, sha) = a.finish().expect("complete");
        assert_eq!((bytes.as_slice(), len), (&b"abcdef"[..], 6));
        assert_eq!(sha, hex::encode(Sha256::digest(b"abcdef")));
    }

    #[test]
    fn gaps_foreign_senders_and_excess_break_the_transfer() {
        let mut gap = Assembly::new("site-b", Vec::new(), None, 100);
        gap.push("site-b", 5, b"x");
        assert!(gap.problem().expect("broken").contains("offset 5"));

        let mut foreign = Assembly::new("site-b", Vec::new(), None, 100);
        foreign.push("site-b", 0, b"x");
        foreign.push("site-c", 1, b"y");
        assert!(foreign.problem().expect("broken").contains("site-c"));
        assert_eq!(foreign.len(), 1);

        let mut excess = Assembly::new("coordinator", Vec::new(), Some(2), 100);
        excess.push("coordinator", 0, b"abc");
        assert!(excess.problem().expect("broken").contains("announced"));

        let mut capped = Assembly::new("site-a", Vec::new(), None, 4);
        capped.push("site-a", 0, b"abcd");
        capped.push("site-a", 4, b"e");
        assert!(capped.problem().expect("broken").contains("larger than 4"));

        let huge = Assembly::new("coordinator", Vec::new(), Some(1 << 40), 1 << 20);
        assert!(huge.problem().is_some());
        assert!(huge.finish().is_err());
    }
}
