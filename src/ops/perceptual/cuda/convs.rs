//! The convolutions of a schedule, behind one seam: cuDNN with a plan's
//! algorithms and workspace on the device, a direct loop in the emulator
//! tests (`cuda/tests.rs`, `steps/tests/`).

use crate::cuda::cudnn::{CudnnConv, Handle};
use crate::error::{Error, Result};

/// The convolutions of a schedule, by layer index. Addresses are device
/// addresses in NHWC; filters KRSC.
pub(crate) trait Convs {
    /// `y = conv(x)` through convolution `layer` over `images` images (the
    /// 2N batch or one half).
    ///
    /// # Safety
    /// Every address holds the planned shape of the layer.
    unsafe fn forward(
        &self,
        layer: usize,
        images: usize,
        x: u64,
        weight: u64,
        y: u64,
    ) -> Result<()>;
    /// `dx = conv^T(dy)` through convolution `layer` over the pred half.
    ///
    /// # Safety
    /// As for `forward`.
    unsafe fn backward_data(&self, layer: usize, weight: u64, dy: u64, dx: u64) -> Result<()>;
}

/// cuDNN with a plan's algorithms (by layer index) and workspace.
pub(crate) struct Cudnn<'a> {
    pub handle: &'a Handle,
    pub convs: &'a [Option<CudnnConv>],
    pub workspace: u64,
}

impl Cudnn<'_> {
    fn conv(&self, layer: usize) -> Result<&CudnnConv> {
        self.convs
            .get(layer)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::Internal(format!("no cuDNN plan for layer {layer}")))
    }
}

impl Convs for Cudnn<'_> {
    unsafe fn forward(
        &self,
        layer: usize,
        images: usize,
        x: u64,
        weight: u64,
        y: u64,
    ) -> Result<()> {
        let conv = self.conv(layer)?;
        if conv.forward_images != images {
            return Err(Error::Internal(format!(
                "layer {layer} planned for {} images, called with {images}",
                conv.forward_images
            )));
        }
        conv.forward(self.handle, x, weight, y, self.workspace)
    }

    unsafe fn backward_data(&self, layer: usize, weight: u64, dy: u64, dx: u64) -> Result<()> {
        self.conv(layer)?
            .backward_data(self.handle, weight, dy, dx, self.workspace)
    }
}
