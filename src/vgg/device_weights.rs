//! The VGG parameters on a CUDA device: uploaded once, filters converted to
//! the compute dtype in the KRSC layout cuDNN's NHWC convolutions read (the
//! 3 input channels padded to [`INPUT_CHANNELS`]), biases in f32.

use super::weights::{ConvWeights, HostWeights};
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::{as_bytes, DType, Element, PerDType};
use cudarc::driver::{CudaSlice, DevicePtr};

/// Channels the 3-channel input is padded to on the device, so that every
/// NHWC row is a whole number of 16-byte vectors (tensor-core friendly).
pub(crate) const INPUT_CHANNELS: usize = 8;

/// One convolution's parameters on the device.
struct DeviceConv {
    weight: CudaSlice<u8>,
    bias: CudaSlice<f32>,
}

/// The network's resident parameters on one device, by layer index.
pub(crate) struct DeviceWeights {
    by_layer: Vec<Option<DeviceConv>>,
    /// The compute dtype of the filters.
    pub dtype: DType,
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let convs = self.by_layer.iter().flatten().count();
        write!(f, "DeviceWeights({convs} convs, {})", self.dtype.name())
    }
}

/// Device addresses of one convolution's filter and bias.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvAddrs {
    pub weight: u64,
    pub bias: u64,
}

/// Device addresses of every convolution's parameters, by layer index.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerAddrs(pub Vec<Option<ConvAddrs>>);

impl LayerAddrs {
    /// The parameters of convolution layer `layer`.
    pub(crate) fn conv(&self, layer: usize) -> Result<ConvAddrs> {
        self.0
            .get(layer)
            .copied()
            .flatten()
            .ok_or_else(|| Error::Internal(format!("layer {layer} has no convolution weights")))
    }
}

/// `values` rounded to `dtype`, as little-endian bytes.
pub(crate) fn to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    struct Convert<'a>(&'a [f32]);
    impl PerDType for Convert<'_> {
        type Output = Vec<u8>;
        fn run<T: Element>(self) -> Vec<u8> {
            let typed: Vec<T> = self.0.iter().map(|&v| T::from_f64(v as f64)).collect();
            as_bytes(&typed).to_vec()
        }
    }
    dtype.dispatch(Convert(values))
}

/// Input channels of a convolution as the device sees them.
fn padded_in(in_c: usize) -> usize {
    in_c.max(INPUT_CHANNELS)
}

/// A filter as the device keeps it: [out][in][ky][kx] ->
/// [out][ky][kx][in padded], in `dtype`.
pub(crate) fn krsc_bytes(p: &ConvWeights, dtype: DType) -> Vec<u8> {
    let in_c = padded_in(p.in_c);
    let mut krsc = Vec::with_capacity(p.out_c * 9 * in_c);
    for o in 0..p.out_c {
        for k in 0..9 {
            krsc.extend((0..in_c).map(|c| match c < p.in_c {
                true => p.weight[(o * p.in_c + c) * 9 + k],
                false => 0.0,
            }));
        }
    }
    to_bytes(&krsc, dtype)
}

/// Uploads every convolution once, converted to `dtype`, and waits so the
/// weights are ready for any stream.
pub(crate) fn upload(dev: &CudaDevice, host: &HostWeights, dtype: DType) -> Result<DeviceWeights> {
    let st = dev.stream();
    let mut by_layer = Vec::new();
    for (layer, p) in host.convs() {
        by_layer.resize_with(layer + 1, || None);
        let filter = krsc_bytes(p, dtype);
        by_layer[layer] = Some(DeviceConv {
            weight: st
                .clone_htod(&filter)
                .map_err(|e| Error::cuda_alloc("a filter", filter.len(), e))?,
            bias: st
                .clone_htod(&p.bias)
                .map_err(|e| Error::cuda_alloc("a bias", 4 * p.bias.len(), e))?,
        });
    }
    dev.synchronize()?;
    Ok(DeviceWeights { by_layer, dtype })
}

impl DeviceWeights {
    /// The addresses of every convolution's filter and bias.
    pub(crate) fn addrs(&self, dev: &CudaDevice) -> LayerAddrs {
        let addr = |c: &DeviceConv| ConvAddrs {
            weight: c.weight.device_ptr(dev.stream()).0,
            bias: c.bias.device_ptr(dev.stream()).0,
        };
        LayerAddrs(self.by_layer.iter().map(|c| c.as_ref().map(addr)).collect())
    }
}
