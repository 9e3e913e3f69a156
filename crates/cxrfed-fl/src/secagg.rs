//! Secure aggregation (after Bonawitz et al., CCS 2017, without the dropout-recovery shares):
//! each site of a round attempt encodes its weighted, clipped and noised delta in fixed point
//! (integers mod 2^64), and adds, for every other site of the attempt, a mask drawn from a
//! ChaCha20 stream seeded by their X25519 shared secret — added by the site whose name sorts
//! first, subtracted by the other. The masks cancel in the sum of all the attempt's updates, so
//! the coordinator learns the sum and nothing about any one update; a single masked update is
//! indistinguishable from uniform noise without the pair secrets.
//!
//! A site that drops after the key exchange leaves its masks in the others' updates: the
//! coordinator cannot unmask the sum, discards the attempt and the round is retried with fresh
//! keys. No secret is ever revealed to recover, so no update is ever exposed (at the cost of
//! the attempt's training, charged again on the retry).
//!
//! Each site's round key is signed with its node certificate key (verified by every peer
//! against the study CA), so the coordinator cannot sit in the middle of a pair.

use std::collections::BTreeMap;

use rand::RngCore;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::tensor::{Tensor, Weights};

/// Fractional bits of the fixed-point encoding (resolution 2^-20 ≈ 1e-6).
pub const FRACTION_BITS: u32 = 20;
const SCALE: f64 = (1u64 << FRACTION_BITS) as f64;
/// The largest encoded magnitude of one coordinate (2^52), so that the sum of up to 2^10 sites
/// stays inside i64.
const MAX_ENCODED: f64 = (1u64 << 52) as f64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecAggError {
    #[error("{0}: a weighted value is too large or not finite to encode in fixed point")]
    Range(String),
    #[error("the masked update is unreadable: {0}")]
    Unreadable(String),
    #[error("the masked update's tensors differ from the round's: {0}")]
    Layout(String),
    #[error("a peer key is not 32 bytes")]
    Key,
}

/// A site's ephemeral key pair for one round attempt.
pub struct KeyPair {
    secret: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh key pair from the operating system's randomness.
    pub fn generate() -> Result<KeyPair, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        Ok(KeyPair { secret, public })
    }

    pub fn public(&self) -> [u8; 32] {
        self.public
    }
}

/// What a site signs to vouch for its round key (and what its peers verify).
pub fn key_statement(
    study: &str,
    job: &str,
    round: u32,
    attempt: u32,
    site: &str,
    public_key: &[u8],
) -> Vec<u8> {
    let mut out = b"cxrfed-secagg-key-v1".to_vec();
    for part in [study, job, site] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&round.to_be_bytes());
    out.extend_from_slice(&attempt.to_be_bytes());
    out.extend_from_slice(public_key);
    out
}

/// A fixed-point update: per tensor name, its shape and its values mod 2^64.
pub type Encoded = BTreeMap<String, (Vec<usize>, Vec<u64>)>;

/// `update` scaled by `weight` in fixed point, tensors in name order.
pub fn encode(update: &Weights, weight: f64) -> Result<Encoded, SecAggError> {
    update
        .iter()
        .map(|(name, t)| {
            let values = t
                .data
                .iter()
                .map(|v| {
                    let x = (f64::from(*v) * weight * SCALE).round();
                    if x.is_finite() && x.abs() <= MAX_ENCODED {
                        Ok(x as i64 as u64)
                    } else {
                        Err(SecAggError::Range(name.clone()))
                    }
                })
                .collect::<Result<Vec<u64>, _>>()?;
            Ok((name.clone(), (t.shape.clone(), values)))
        })
        .collect()
}

/// Adds this site's pair masks with every peer (site name, public key) to `encoded`. `context`
/// binds the masks to one round attempt of one job.
pub fn mask(
    encoded: &mut Encoded,
    me: &str,
    keys: &KeyPair,
    peers: &[(String, Vec<u8>)],
    context: &[u8],
) -> Result<(), SecAggError> {
    for (peer, public) in peers {
        if peer == me {
            continue;
        }
        let public: [u8; 32] = public.as_slice().try_into().map_err(|_| SecAggError::Key)?;
        let shared = keys
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(public));
        let (lo, hi) = if me < peer.as_str() {
            (me, peer.as_str())
        } else {
            (peer.as_str(), me)
        };
        let mut seed = Sha256::new();
        seed.update(b"cxrfed-secagg-mask-v1");
        for part in [context, lo.as_bytes(), hi.as_bytes(), shared.as_bytes()] {
            seed.update((part.len() as u32).to_be_bytes());
            seed.update(part);
        }
        let mut rng = ChaCha20Rng::from_seed(seed.finalize().into());
        let add = me < peer.as_str();
        for (_, values) in encoded.values_mut() {
            for v in values.iter_mut() {
                let m = rng.next_u64();
                *v = if add {
                    v.wrapping_add(m)
                } else {
                    v.wrapping_sub(m)
                };
            }
        }
    }
    Ok(())
}

/// A masked update as safetensors of u64 tensors (little-endian), named like the delta.
pub fn to_bytes(
    encoded: &BTreeMap<String, (Vec<usize>, Vec<u64>)>,
) -> Result<Vec<u8>, SecAggError> {
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = encoded
        .iter()
        .map(|(n, (shape, v))| {
            (
                n.clone(),
                shape.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views = raw
        .iter()
        .map(|(n, shape, bytes)| {
            TensorView::new(Dtype::U64, shape.clone(), bytes)
                .map(|view| (n.clone(), view))
                .map_err(|e| SecAggError::Unreadable(format!("{e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, &None).map_err(|e| SecAggError::Unreadable(format!("{e:?}")))
}

/// The sum of a round attempt's masked updates, mod 2^64.
#[derive(Debug)]
pub struct MaskedSum {
    layout: BTreeMap<String, Vec<usize>>,
    sums: BTreeMap<String, Vec<u64>>,
    weight: f64,
    sites: usize,
}

impl MaskedSum {
    /// An empty sum over tensors of the global model's layout.
    pub fn new(layout: BTreeMap<String, Vec<usize>>) -> MaskedSum {
        MaskedSum {
            layout,
            sums: BTreeMap::new(),
            weight: 0.0,
            sites: 0,
        }
    }

    /// Folds in one site's masked update and the weight it applied. Every update of the
    /// attempt must cover the same tensors; nothing is added unless the update is valid.
    pub fn add(&mut self, bytes: &[u8], weight: f64) -> Result<(), SecAggError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(SecAggError::Layout("a non-positive weight".into()));
        }
        let tensors = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| SecAggError::Unreadable(format!("{e:?}")))?;
        let mut parsed = BTreeMap::new();
        for (name, view) in tensors.tensors() {
            if view.dtype() != Dtype::U64 {
                return Err(SecAggError::Layout(format!("{name} is not u64")));
            }
            match self.layout.get(&name) {
                Some(shape) if shape.as_slice() == view.shape() => {}
                _ => return Err(SecAggError::Layout(format!("{name} {:?}", view.shape()))),
            }
            let values: Vec<u64> = view
                .data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect();
            parsed.insert(name, values);
        }
        if parsed.is_empty() {
            return Err(SecAggError::Layout("an empty update".into()));
        }
        if self.sites > 0 && !parsed.keys().eq(self.sums.keys()) {
            return Err(SecAggError::Layout(
                "the update covers other tensors than the attempt's first".into(),
            ));
        }
        for (name, values) in parsed {
            let sum = self
                .sums
                .entry(name)
                .or_insert_with(|| vec![0; values.len()]);
            for (s, v) in sum.iter_mut().zip(values) {
                *s = s.wrapping_add(v);
            }
        }
        self.weight += weight;
        self.sites += 1;
        Ok(())
    }

    pub fn sites(&self) -> usize {
        self.sites
    }

    /// The weighted mean delta, once every masked update of the attempt is in (the masks
    /// cancel only then).
    pub fn mean(self) -> Weights {
        let weight = self.weight.max(f64::MIN_POSITIVE);
        self.sums
            .into_iter()
            .map(|(name, sum)| {
                let data = sum
                    .into_iter()
                    .map(|s| (s as i64 as f64 / SCALE / weight) as f32)
                    .collect();
                let shape = self.layout.get(&name).cloned().unwrap_or_default();
                (name, Tensor { shape, data })
            })
            .collect()
    }
}

/// The L2 norm of a delta.
pub fn l2_norm(update: &Weights) -> f64 {
    update
        .values()
        .flat_map(|t| t.data.iter())
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(values: &[f32]) -> Weights {
        let mut w = Weights::new();
        w.insert(
            "heads.x.weight".into(),
            Tensor {
                shape: vec![values.len()],
                data: values.to_vec(),
            },
        );
        w
    }

    #[test]
    fn masks_cancel_in_the_sum_and_hide_each_update() {
        let sites = ["site-a", "site-b", "site-c"];
        let keys: Vec<KeyPair> = sites
            .iter()
            .map(|_| KeyPair::generate().expect("key"))
            .collect();
        let peers: Vec<(String, Vec<u8>)> = sites
            .iter()
            .zip(&keys)
            .map(|(s, k)| (s.to_string(), k.public().to_vec()))
            .collect();
        let updates = [
            delta(&[0.5, -0.25, 0.125]),
            delta(&[0.1, 0.2, -0.3]),
            delta(&[-0.05, 0.0, 1.0]),
        ];
        let weights = [1.0, 2.0, 3.0];
        let layout: BTreeMap<String, Vec<usize>> = [("heads.x.weight".to_string(), vec![3])]
            .into_iter()
            .collect();
        let mut sum = MaskedSum::new(layout.clone());
        for ((site, key), (update, weight)) in
            sites.iter().zip(&keys).zip(updates.iter().zip(weights))
        {
            let mut encoded = encode(update, weight).expect("encode");
            let plain = encoded.clone();
            mask(&mut encoded, site, key, &peers, b"job/r1/a1").expect("mask");
            assert_ne!(encoded, plain, "a masked update differs from the plain one");
            // A single masked update decodes to noise, not the update.
            let bytes = to_bytes(&encoded).expect("bytes");
            let mut alone = MaskedSum::new(layout.clone());
            alone.add(&bytes, weight).expect("add");
            let seen = alone.mean();
            assert!(
                seen["heads.x.weight"]
                    .data
                    .iter()
                    .zip(&update["heads.x.weight"].data)
                    .all(|(s, u)| (s - u).abs() > 1.0),
                "{seen:?}"
            );
            sum.add(&bytes, weight).expect("add");
        }
        let mean = sum.mean();
        for i in 0..3 {
            let expected: f64 = updates
                .iter()
                .zip(weights)
                .map(|(u, w)| f64::from(u["heads.x.weight"].data[i]) * w)
                .sum::<f64>()
                / 6.0;
            let got = f64::from(mean["heads.x.weight"].data[i]);
            assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        }
    }

    #[test]
    fn a_missing_site_leaves_the_sum_masked_and_bad_updates_are_refused() {
        let sites = ["a", "b", "c"];
        let keys: Vec<KeyPair> = sites
            .iter()
            .map(|_| KeyPair::generate().expect("key"))
            .collect();
        let peers: Vec<(String, Vec<u8>)> = sites
            .iter()
            .zip(&keys)
            .map(|(s, k)| (s.to_string(), k.public().to_vec()))
            .collect();
        let layout: BTreeMap<String, Vec<usize>> = [("heads.x.weight".to_string(), vec![2])]
            .into_iter()
            .collect();
        let mut sum = MaskedSum::new(layout.clone());
        for (site, key) in sites.iter().zip(&keys).take(2) {
            let mut e = encode(&delta(&[0.5, 0.5]), 1.0).expect("encode");
            mask(&mut e, site, key, &peers, b"ctx").expect("mask");
            sum.add(&to_bytes(&e).expect("bytes"), 1.0).expect("add");
        }
        let partial = sum.mean();
        assert!(
            partial["heads.x.weight"]
                .data
                .iter()
                .all(|v| (v - 0.5).abs() > 1.0)
        );

        let mut sum = MaskedSum::new(layout);
        assert!(sum.add(b"not safetensors", 1.0).is_err());
        let wrong = encode(&delta(&[1.0, 2.0, 3.0]), 1.0).expect("encode");
        assert!(matches!(
            sum.add(&to_bytes(&wrong).expect("bytes"), 1.0),
            Err(SecAggError::Layout(_))
        ));
        assert!(matches!(
            encode(&delta(&[f32::NAN]), 1.0),
            Err(SecAggError::Range(_))
        ));
        assert!(matches!(
            encode(&delta(&[1.0]), 1e20),
            Err(SecAggError::Range(_))
        ));
    }
}
