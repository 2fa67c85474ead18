//! The VGG parameters on a CUDA device: uploaded once, filters converted to
//! the compute dtype in the KRSC layout cuDNN's NHWC convolutions read (the
//! 3 input channels padded to 8), biases in f32.

use super::schedule::INPUT_CHANNELS;
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::tensor::DType;
use crate::vgg::ConvWeights;
use cudarc::driver::{CudaSlice, DevicePtr};
use half::{bf16, f16};

/// One convolution's parameters on the device: the filter in the compute
/// dtype, KRSC (NHWC) layout, input channels padded for the first layer,
/// and the bias in f32.
pub(crate) struct DeviceConv {
    weight: CudaSlice<u8>,
    bias: CudaSlice<f32>,
}

/// The network's resident parameters on one device.
pub(crate) struct DeviceWeights {
    convs: Vec<DeviceConv>,
    /// The compute dtype of the filters.
    pub dtype: DType,
}

impl std::fmt::Debug for DeviceWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceWeights({} convs, {})",
            self.convs.len(),
            self.dtype.name()
        )
    }
}

/// Device addresses of one convolution's filter and bias.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvAddrs {
    pub weight: u64,
    pub bias: u64,
}

/// `values` in `dtype`, little-endian, as the device reads them.
pub(crate) fn to_bytes(values: impl Iterator<Item = f32>, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.flat_map(f32::to_le_bytes).collect(),
        DType::F16 => values
            .flat_map(|v| f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::BF16 => values
            .flat_map(|v| bf16::from_f32(v).to_le_bytes())
            .collect(),
    }
}

/// Input channels of a convolution as the device sees them.
fn padded_in(in_c: usize) -> usize {
    in_c.max(INPUT_CHANNELS)
}

/// A filter as the device keeps it: [out][in][ky][kx] ->
/// [out][ky][kx][in padded], in `dtype`.
pub(crate) fn krsc_bytes(p: &ConvWeights, dtype: DType) -> Vec<u8> {
    let in_c = padded_in(p.in_c);
    let krsc = (0..p.out_c).flat_map(|o| {
        (0..9).flat_map(move |k| {
            (0..in_c).map(move |c| {
                if c < p.in_c {
                    p.weight[(o * p.in_c + c) * 9 + k]
                } else {
                    0.0
                }
            })
        })
    });
    to_bytes(krsc, dtype)
}

fn upload_err(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::cuda(what, e)
}

/// Uploads every convolution once, converted to `dtype`, and waits so the
/// weights are ready for any stream.
pub(crate) fn upload(
    dev: &CudaDevice,
    convs: &[ConvWeights],
    dtype: DType,
) -> Result<DeviceWeights> {
    let st = dev.stream();
    let mut out = Vec::with_capacity(convs.len());
    for p in convs {
        out.push(DeviceConv {
            weight: st
                .clone_htod(&krsc_bytes(p, dtype))
                .map_err(upload_err("uploading weights"))?,
            bias: st
                .clone_htod(&p.bias)
                .map_err(upload_err("uploading biases"))?,
        });
    }
    dev.synchronize()?;
    Ok(DeviceWeights { convs: out, dtype })
}

impl DeviceWeights {
    pub(crate) fn addrs(&self, dev: &CudaDevice) -> Vec<ConvAddrs> {
        self.convs
            .iter()
            .map(|c| ConvAddrs {
                weight: c.weight.device_ptr(dev.stream()).0,
                bias: c.bias.device_ptr(dev.stream()).0,
            })
            .collect()
    }
}
