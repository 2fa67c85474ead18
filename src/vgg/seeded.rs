//! Deterministic stand-in weights, for demos, benchmarks and machines
//! without the pretrained file: He-uniform filters from a seeded generator,
//! zero biases, written as the same safetensors image torchvision exports.
//! Losses computed with them are well-defined but not perceptually
//! meaningful; real use loads exported torchvision weights.

use super::arch::{Module, VggArch};
use crate::error::{Error, Result};

/// A safetensors image of `arch`'s `features` with seeded weights (f32).
pub fn seeded_safetensors(arch: VggArch, seed: u64) -> Result<Vec<u8>> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut uniform = move || {
        // splitmix64 -> [-1, 1)
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in arch.layers() {
        if let Module::Conv { in_c, out_c, .. } = layer.module {
            let bound = (6.0 / (in_c * 9) as f32).sqrt();
            let weight = (0..out_c * in_c * 9)
                .flat_map(|_| (uniform() * bound).to_le_bytes())
                .collect();
            tensors.push((
                format!("features.{}.weight", layer.index),
                vec![out_c, in_c, 3, 3],
                weight,
            ));
            tensors.push((
                format!("features.{}.bias", layer.index),
                vec![out_c],
                vec![0; out_c * 4],
            ));
        }
    }
    let internal =
        |e: safetensors::SafeTensorError| Error::Internal(format!("writing seeded weights: {e}"));
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map_err(internal)?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None).map_err(internal)
}
