//! The VGG feature network: architecture tables and resident weights.
//!
//! A [`Vgg`] is loaded once (from a path or bytes; nothing is ever
//! downloaded), converted to the compute dtype, and shared by `Arc` between
//! any number of losses and threads.

mod arch;
pub(crate) mod device_weights;
mod seeded;
mod weights;

pub use arch::VggArch;
pub(crate) use arch::{output_dims, Dims, Layer, Module};
pub(crate) use device_weights::{DeviceWeights, LayerAddrs, INPUT_CHANNELS};
pub use seeded::seeded_safetensors;
use weights::Source;
pub(crate) use weights::{ConvWeights, HostWeights};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::path::Path;
use std::sync::Arc;

/// The 2x2 pooling between blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pooling {
    /// Max-pooling, as in VGG (default).
    #[default]
    Max,
    /// Average pooling (a common choice for style transfer).
    Avg,
}

/// Where the weights come from.
#[derive(Debug, Clone, Copy)]
pub enum WeightsSource<'a> {
    /// A safetensors file.
    Path(&'a Path),
    /// The bytes of a safetensors file.
    Bytes(&'a [u8]),
}

/// How to load a [`Vgg`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VggOptions {
    /// VGG16 (default) or VGG19.
    pub arch: VggArch,
    /// The dtype convolutions run in on the GPU. The CPU backend always
    /// computes in f32 with f64 loss sums, whatever is asked here, and
    /// [`Vgg::compute_dtype`] says so.
    pub compute: DType,
    /// The deepest module to load, by torchvision index (`Some(22)` loads
    /// up to relu4_3; every convolution up to it must be in the file);
    /// `None` loads as deep as the file goes: all of `features`, or, for a
    /// file holding a prefix of the network, every layer before the first
    /// convolution it lacks. Losses can tap only loaded modules.
    pub up_to: Option<usize>,
}

impl Default for VggOptions {
    fn default() -> Self {
        VggOptions {
            arch: VggArch::Vgg16,
            compute: DType::F32,
            up_to: None,
        }
    }
}

/// Resident VGG `features` weights on one device. `Send + Sync`: share it
/// with `Arc` between losses, threads and streams.
#[derive(Debug)]
pub struct Vgg {
    arch: VggArch,
    compute: DType,
    device: Device,
    layers: Vec<Layer>,
    resident: Resident,
}

/// The parameters, kept once where they are used: f32 on the host for the
/// CPU backend, or converted and uploaded for a CUDA device (no host copy).
#[derive(Debug)]
enum Resident {
    Host(HostWeights),
    Cuda(DeviceWeights),
}

impl Vgg {
    /// Loads `arch` from `source` for `device`, all of `features`.
    pub fn load(
        device: &Device,
        source: WeightsSource<'_>,
        arch: VggArch,
        compute: DType,
    ) -> Result<Arc<Vgg>> {
        Vgg::load_with(
            device,
            source,
            VggOptions {
                arch,
                compute,
                up_to: None,
            },
        )
    }

    /// Loads with explicit options.
    pub fn load_with(
        device: &Device,
        source: WeightsSource<'_>,
        options: VggOptions,
    ) -> Result<Arc<Vgg>> {
        let (mut layers, depth) = Vgg::layers_asked(options)?;
        let mut source = Source::of(source)?;
        let (host, count) = weights::read(&mut source, options.arch, &layers, depth)?;
        layers.truncate(count);
        // Where the weights stay: the one device dispatch of the network.
        let resident = match device.cuda_device() {
            Some(dev) => {
                crate::cuda::cudnn::require()?;
                Resident::Cuda(device_weights::upload(dev, &host, options.compute)?)
            }
            None => Resident::Host(host),
        };
        let compute = match resident {
            Resident::Host(_) => DType::F32,
            Resident::Cuda(_) => options.compute,
        };
        Ok(Arc::new(Vgg {
            arch: options.arch,
            compute,
            device: device.clone(),
            layers,
            resident,
        }))
    }

    /// The index of the deepest module [`Vgg::load_with`] would load from
    /// `source` with `options`, checking the file's header (names, shapes,
    /// dtypes, byte ranges) without reading any tensor data.
    pub fn depth_in(source: WeightsSource<'_>, options: VggOptions) -> Result<usize> {
        let (layers, depth) = Vgg::layers_asked(options)?;
        let mut source = Source::of(source)?;
        Ok(weights::depth(&mut source, options.arch, &layers, depth)? - 1)
    }

    /// The layers `options` asks for, and whether all must be in the file.
    fn layers_asked(options: VggOptions) -> Result<(Vec<Layer>, weights::Depth)> {
        let mut layers = options.arch.layers();
        let Some(last) = options.up_to else {
            return Ok((layers, weights::Depth::AsFileGoes));
        };
        if last >= layers.len() {
            return Err(Error::arg(format!(
                "up_to = {last} but {} has modules 0 to {}",
                options.arch.name(),
                layers.len() - 1
            )));
        }
        layers.truncate(last + 1);
        Ok((layers, weights::Depth::Whole))
    }

    /// The architecture.
    pub fn arch(&self) -> VggArch {
        self.arch
    }

    /// The dtype the network computes in: the one asked for on CUDA, f32
    /// on the CPU.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Index of the deepest loaded module.
    pub fn depth(&self) -> usize {
        self.layers.len() - 1
    }

    pub(crate) fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The parameters of a network loaded for the CPU.
    pub(crate) fn host_weights(&self) -> Result<&HostWeights> {
        match &self.resident {
            Resident::Host(w) => Ok(w),
            Resident::Cuda(_) => Err(Error::Internal(
                "a CPU computation on a network loaded for CUDA".into(),
            )),
        }
    }

    /// The parameters of a network loaded for a CUDA device.
    pub(crate) fn device_weights(&self) -> Result<&DeviceWeights> {
        match &self.resident {
            Resident::Host(_) => Err(Error::Internal(
                "a CUDA computation on a network loaded for the CPU".into(),
            )),
            Resident::Cuda(w) => Ok(w),
        }
    }
}
