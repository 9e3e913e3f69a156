//! The one f32 safetensors codec of cxrfed: global weights, site updates and FedAdam moments
//! all travel and rest in this form. The coordinator aggregates these buffers without
//! libtorch; the node's model crate converts them to and from tch tensors.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors};

// safetensors stores little-endian values; the casts below reinterpret memory as such.
#[cfg(not(target_endian = "little"))]
compile_error!("cxrfed-fl's f32 codec assumes a little-endian target");

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unreadable weights: {0}")]
    Format(String),
}

/// One tensor: shape and row-major f32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Named tensors, as in a safetensors file.
pub type Weights = BTreeMap<String, Tensor>;

fn only_f32(name: &str, dtype: Dtype) -> Result<(), CodecError> {
    if dtype != Dtype::F32 {
        return Err(CodecError::Format(format!(
            "{name}: dtype {dtype:?}; only f32 weights are exchanged"
        )));
    }
    Ok(())
}

/// Reads a safetensors buffer of f32 tensors.
pub fn decode(bytes: &[u8]) -> Result<Weights, CodecError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| CodecError::Format(format!("{e:?}")))?;
    let mut out = Weights::new();
    for (name, view) in file.tensors() {
        only_f32(&name, view.dtype())?;
        // The data of a safetensors tensor need not be 4-byte aligned: copy, don't cast.
        let data: Vec<f32> = bytemuck::pod_collect_to_vec(view.data());
        out.insert(
            name,
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// A tensor as safetensors sees it: its bytes are borrowed from the f32 values, so encoding
/// holds the output buffer and nothing else.
struct F32View<'a>(&'a Tensor);

impl safetensors::tensor::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.0.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(&self.0.data))
    }

    fn data_len(&self) -> usize {
        self.0.data.len() * 4
    }
}

/// Writes named f32 tensors as a safetensors buffer.
pub fn encode(weights: &Weights) -> Result<Vec<u8>, CodecError> {
    for (name, t) in weights {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(CodecError::Format(format!(
                "{name}: shape {:?} does not hold {} values",
                t.shape,
                t.data.len()
            )));
        }
    }
    safetensors::serialize(
        weights.iter().map(|(name, t)| (name.as_str(), F32View(t))),
        &None,
    )
    .map_err(|e| CodecError::Format(format!("{e:?}")))
}

/// The names of a safetensors buffer's tensors, after checking that all are f32 (reads the
/// header, copies nothing).
pub fn f32_names(bytes: &[u8]) -> Result<Vec<String>, CodecError> {
    Ok(layout(bytes)?.into_keys().collect())
}

/// Every tensor's shape, by name, after checking that all are f32 (reads the header, copies
/// no values): what an aggregator needs to know of the global model.
pub fn layout(bytes: &[u8]) -> Result<BTreeMap<String, Vec<usize>>, CodecError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| CodecError::Format(format!("{e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        only_f32(&name, view.dtype())?;
        out.insert(name, view.shape().to_vec());
    }
    Ok(out)
}

/// The L2 norm of a set of tensors.
pub fn l2_norm(weights: &Weights) -> f64 {
    weights
        .values()
        .flat_map(|t| &t.data)
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn refuses_what_is_not_f32_safetensors() {
        assert!(decode(b"not safetensors").is_err());
        let bad_shape = Weights::from([(
            "a".to_string(),
            Tensor {
                shape: vec![3],
                data: vec![1.0],
            },
        )]);
        assert!(encode(&bad_shape).is_err());
        let f64_file = safetensors::serialize(
            [(
                "x",
                safetensors::tensor::TensorView::new(Dtype::F64, vec![1], &[0u8; 8]).expect("view"),
            )],
            &None,
        )
        .expect("serialize");
        assert!(decode(&f64_file).is_err());
        assert!(f32_names(&f64_file).is_err());
    }

    proptest! {
        #[test]
        fn round_trips_bit_exactly(values in proptest::collection::vec(any::<f32>(), 0..64), rows in 1usize..4) {
            let cols = values.len() / rows;
            let data = values[..rows * cols].to_vec();
            let w = Weights::from([
                ("a.weight".to_string(), Tensor { shape: vec![rows, cols], data: data.clone() }),
                ("b.bias".to_string(), Tensor { shape: vec![1], data: vec![0.5] }),
            ]);
            let bytes = encode(&w).expect("encode");
            let back = decode(&bytes).expect("decode");
            prop_assert_eq!(back["a.weight"].shape.clone(), vec![rows, cols]);
            let same = back["a.weight"].data.iter().zip(&data).all(|(a, b)| a.to_bits() == b.to_bits());
            prop_assert!(same);
            let mut names = f32_names(&bytes).expect("names");
            names.sort();
            prop_assert_eq!(names, vec!["a.weight".to_string(), "b.bias".to_string()]);
            let shapes = layout(&bytes).expect("layout");
            prop_assert_eq!(shapes["a.weight"].clone(), vec![rows, cols]);
        }
    }
}
