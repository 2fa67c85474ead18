//! Reading VGG `features` weights from safetensors (docs/design.md,
//! "Weights").
//!
//! Names are torchvision's (`features.N.weight`, `features.N.bias`),
//! optionally behind a `vgg16.`, `vgg19.` or `model.` prefix. Tensors may be
//! f32, f16 or bf16; they are converted to f32 here. Other tensors (the
//! classifier, say) are ignored. Every problem is an error naming the tensor.

use super::arch::{Layer, Module, VggArch};
use crate::error::{Error, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

/// One convolution's parameters in f32: weight [out][in][3][3], bias [out].
#[derive(Debug, Clone)]
pub(crate) struct ConvWeights {
    pub in_c: usize,
    pub out_c: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Every convolution's parameters in f32, by layer index.
#[derive(Debug, Clone)]
pub(crate) struct HostWeights {
    by_layer: Vec<Option<ConvWeights>>,
}

impl HostWeights {
    /// The parameters of convolution layer `layer`.
    pub(crate) fn conv(&self, layer: usize) -> Result<&ConvWeights> {
        self.by_layer
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Internal(format!("layer {layer} has no convolution weights")))
    }

    /// (layer, parameters) of every convolution, in order.
    pub(crate) fn convs(&self) -> impl Iterator<Item = (usize, &ConvWeights)> {
        self.by_layer
            .iter()
            .enumerate()
            .filter_map(|(layer, c)| Some((layer, c.as_ref()?)))
    }
}

const PREFIXES: [&str; 4] = ["", "vgg16.", "vgg19.", "model."];

fn bad(msg: String) -> Error {
    Error::InvalidWeights(msg)
}

/// The conv weights of `layers`, read from a safetensors image.
pub(crate) fn read(bytes: &[u8], arch: VggArch, layers: &[Layer]) -> Result<HostWeights> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let names = file.names();
    // The prefix is the one under which features.0.weight exists.
    let prefix = PREFIXES
        .iter()
        .find(|p| names.iter().any(|n| **n == format!("{p}features.0.weight")))
        .ok_or_else(|| {
            bad(format!(
                "no tensor features.0.weight (with an optional vgg16./vgg19./model. prefix) in a file of {} tensors; \
                 is this a torchvision {} state dict?",
                names.len(),
                arch.name()
            ))
        })?;
    let by_layer = layers
        .iter()
        .map(|layer| {
            let Module::Conv { in_c, out_c } = layer.module else {
                return Ok(None);
            };
            let base = format!("{prefix}features.{}", layer.index);
            let weight = tensor(
                &file,
                &format!("{base}.weight"),
                &[out_c, in_c, 3, 3],
                layer,
            )?;
            let bias = tensor(&file, &format!("{base}.bias"), &[out_c], layer)?;
            Ok(Some(ConvWeights {
                in_c,
                out_c,
                weight,
                bias,
            }))
        })
        .collect::<Result<_>>()?;
    Ok(HostWeights { by_layer })
}

fn tensor(file: &SafeTensors<'_>, name: &str, shape: &[usize], layer: &Layer) -> Result<Vec<f32>> {
    let view = file.tensor(name).map_err(|_| {
        bad(format!(
            "missing tensor {name} ({}, needed for the requested depth)",
            layer.name
        ))
    })?;
    if view.shape() != shape {
        return Err(bad(format!(
            "tensor {name} ({}) has shape {:?}, expected {shape:?}",
            layer.name,
            view.shape()
        )));
    }
    let data = view.data();
    let values: Vec<f32> = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(bad(format!(
                "tensor {name} ({}) is {other:?}; expected F32, F16 or BF16",
                layer.name
            )));
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "tensor {name} ({}) has a non-finite value ({}) at element {i}",
            layer.name, values[i]
        )));
    }
    Ok(values)
}
