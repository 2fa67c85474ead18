//! Training losses for image models, on CUDA or the CPU: total variation,
//! feature MSE/MAE and VGG16/VGG19 perceptual loss, with gradients and a C
//! ABI.
//!
//! # Quick start
//!
//! 1. Pick a device: [`Device::best`] is CUDA device 0 when one can be
//!    used, else the CPU (the reference backend, always available).
//! 2. Build a loss from a config: [`TvLoss::new`], [`FeatureLoss::new`],
//!    or load VGG weights once with [`Vgg::load`] and build any number of
//!    [`PerceptualLoss`]es over them.
//! 3. Describe the tensors with [`TensorRef`]/[`TensorMut`] (host slices, or
//!    CUDA slices allocated on [`Device::cuda_stream`]) and call `compute`
//!    with [`LossOutputs`] naming where the loss and gradient go.
//!
//! ```
//! use perceptual_loss::{Device, LossOutputs, Shape, TensorMut, TensorRef, TvConfig, TvLoss};
//!
//! # fn main() -> perceptual_loss::Result<()> {
//! let device = Device::cpu();
//! let shape = Shape::new(1, 1, 3, 3);
//! let x: Vec<f32> = vec![1., 2., 4., 7., 11., 16., 22., 29., 37.];
//! let mut grad = vec![0f32; 9];
//! let mut loss = 0f32;
//! let tv = TvLoss::new(TvConfig::default())?; // the article's TV loss
//! tv.compute(
//!     &device,
//!     &TensorRef::host(&x, shape)?,
//!     LossOutputs::new(TensorMut::scalar(&mut loss)).with_grad(TensorMut::host(&mut grad, shape)?),
//! )?;
//! // Vertical differences 6, 9, 12, 15, 18, 21 square to 1251, horizontal
//! // ones 1, 2, 4, 5, 7, 8 to 159; each direction has 6 of them, so
//! // loss = 2 * (1251 / 6 + 159 / 6) = 470.
//! assert_eq!(loss, 470.0);
//! # Ok(())
//! # }
//! ```
//!
//! # Backends and numerics
//! Every operation runs on both backends behind one API; the [`Device`]
//! passed to a call chooses. Reductions are deterministic: on CUDA each
//! block writes an f64 partial and the last block sums them in a fixed
//! order, so the same input gives a bit-identical loss on every run.
//!
//! # Layout of the crate
//! `docs/design.md` describes it in full. In short: the public API
//! (`ops/<loss>/mod.rs`, re-exported here) validates a call and hands it
//! to `backend::run`, the one place that routes it to the CPU
//! (`ops/<loss>/cpu.rs`) or CUDA (`ops/<loss>/cuda.rs`) implementation of
//! the loss; those use the network (`vgg/`), the device (`device/`) and
//! the CUDA plumbing (`cuda/`), never the other way round.

#![warn(missing_docs)]

mod backend;
mod cuda;
mod device;
mod error;
mod fallible;
pub mod ffi;
mod finite;
pub mod images;
mod ops;
mod recent;
mod skipped;
mod tensor;
mod vgg;

pub use device::{Device, DeviceKind};
pub use error::{Error, Result};
pub use ops::feature::{Criterion, FeatureLoss};
pub use ops::lpips::{LinWeights, Lpips, LpipsConfig, LpipsMaps, LPIPS_TAPS};
pub use ops::perceptual::{
    Card, Floor, InputNorm, PerceptualConfig, PerceptualLoss, PlanReport, Tap,
};
pub use ops::tv::{Reduction, TvConfig, TvLoss, TvVariant};
pub use ops::LossOutputs;
#[doc(hidden)]
pub use skipped::report_skip;
pub use tensor::{DType, Element, Shape, TensorMut, TensorRef};
pub use vgg::{seeded_safetensors, Pooling, Vgg, VggArch, VggOptions, WeightsSource};

/// Re-exported so callers can name CUDA slices and streams without a
/// separate dependency on the same `cudarc` version.
pub use cudarc;
/// Re-exported for the f16/bf16 element types.
pub use half;

/// The crate version, as in `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's Rust example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
