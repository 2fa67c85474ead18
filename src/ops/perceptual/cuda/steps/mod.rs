//! One launch function per step type of the schedule: each turns its step
//! into the launch parameters of its kernel in `kernels/vgg.cu` (or a
//! cuDNN call) on the buffers of a per-shape plan. `forward.rs` has the
//! forward steps, `backward.rs` the backward ones; `tests/` runs each
//! fused step alone under the host emulator against the CPU layers it
//! replaces.

mod backward;
mod forward;
mod gram;
#[cfg(test)]
mod tests;

use super::convs::Convs;
use super::layout::Layout;
use super::schedule::{on_step, Buf, Images, Step, TapTerm};
use super::CudaCall;
use crate::cuda::abi::pl_k_tap_loss_params;
use crate::cuda::{kernel_dtype, kernels, BlockSplit, Gpu, BLOCK};
use crate::error::{Error, Result};
use crate::ops::feature::cuda::criterion_id;
use crate::ops::feature::Criterion;
use crate::ops::perceptual::config::PerceptualSpec;
use crate::tensor::DType;
use crate::vgg::{Layer, LayerAddrs, Pooling};
use cudarc::driver::DeviceRepr;

/// The network as the kernels see it.
#[derive(Clone, Copy)]
pub(crate) struct DeviceNet<'a> {
    pub layers: &'a [Layer],
    pub weights: &'a LayerAddrs,
    pub compute: DType,
    /// LPIPS's channel weights (f32, all five layers), or 0.
    pub lpips: u64,
}

/// Where a call's kept target slots are, for the images of one chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeptAt {
    /// By slot: the address of the chunk's first image there.
    pub addrs: Vec<u64>,
    /// The kept target is one image, which serves every pred image.
    pub shared: bool,
}

impl KeptAt {
    /// Where slots at (address, bytes per image) of a kept target of
    /// `images` images are for a chunk from image `first`: a one-image
    /// target serves every image from its one copy.
    pub(crate) fn of(
        slots: impl Iterator<Item = (u64, usize)>,
        images: usize,
        first: usize,
    ) -> KeptAt {
        let shared = images == 1;
        let first = if shared { 0 } else { first };
        KeptAt {
            addrs: slots
                .map(|(base, per_image)| base + (first * per_image) as u64)
                .collect(),
            shared,
        }
    }
}

/// Everything a step's launch needs: where to queue, the network, the
/// options, the call, and where the schedule's buffers are.
pub(crate) struct Exec<'a, G, C> {
    pub gpu: &'a G,
    pub convs: &'a C,
    pub net: DeviceNet<'a>,
    pub spec: &'a PerceptualSpec,
    pub call: &'a CudaCall,
    /// The buffers: at `base` + the layout's offsets, or a kept slot.
    pub layout: &'a Layout,
    pub base: u64,
    pub kept: &'a KeptAt,
}

impl<G: Gpu, C: Convs> Exec<'_, G, C> {
    /// Queues `step`.
    pub(crate) fn launch(&self, step: &Step) -> Result<()> {
        on_step!(step, s => s.launch(self))
    }

    /// The device address of buffer `b` (`exec::run` checked the kept
    /// slots are all there).
    fn at(&self, b: Buf) -> u64 {
        match self.layout.kept.get(b).copied().flatten() {
            Some(slot) => self.kept.addrs[slot],
            None => self.base + self.layout.offsets[b] as u64,
        }
    }

    /// The loss from the call's two parts, which the taps summed apart
    /// (`pl_vgg_parts_total`): one launch more for a call with parts.
    pub(crate) fn parts_total(&self) -> Result<()> {
        let io = &self.call.io;
        let parts = io
            .parts
            .ok_or_else(|| Error::Internal("a call without parts".into()))?;
        let p = crate::cuda::abi::pl_k_parts_params {
            parts: parts as *mut f32,
            loss: io.loss as *mut f32,
            present: [!self.spec.taps.is_empty(), !self.spec.style.is_empty()].map(i32::from),
        };
        self.kernel("pl_vgg_parts_total", (1, 1), &p)
    }

    /// The address of buffer `b`, or 0 (NULL) without one.
    fn opt(&self, b: Option<Buf>) -> u64 {
        b.map_or(0, |b| self.at(b))
    }

    /// The address of the first of some images of a buffer.
    fn span(&self, x: Images) -> u64 {
        self.at(x.buf) + (x.offset * self.net.compute.size()) as u64
    }

    /// The f32 bias of convolution `layer`, or NULL.
    fn bias(&self, layer: Option<usize>) -> Result<*const f32> {
        match layer {
            Some(l) => Ok(self.net.weights.conv(l)?.bias as *const f32),
            None => Ok(std::ptr::null()),
        }
    }

    /// The compute dtype as the kernels number it.
    fn compute(&self) -> i32 {
        kernel_dtype(self.net.compute)
    }

    /// Whether the pooling averages (the kernels' `avg` flag).
    fn avg(&self) -> i32 {
        (self.spec.pooling == Pooling::Avg) as i32
    }

    /// The normalisation as the kernels take it: normalised = x * scale +
    /// shift per channel.
    fn norm(&self) -> ([f32; 3], [f32; 3]) {
        let (mut scale, mut shift) = ([0f32; 3], [0f32; 3]);
        for c in 0..3 {
            let (a, b) = self.spec.norm.affine(c);
            scale[c] = a as f32;
            shift[c] = b as f32;
        }
        (scale, shift)
    }

    /// Launches kernel `symbol` of kernels/vgg.cu.
    fn kernel(
        &self,
        symbol: &str,
        grid: (u32, u32),
        params: &(impl DeviceRepr + Copy),
    ) -> Result<()> {
        self.gpu.launch_symbol(&kernels::VGG, symbol, grid, params)
    }

    /// A tap's launch: its parameters, with the reduction scratch, and
    /// grid. The grid splits each image's `per_image / unit` work units
    /// (what one thread takes at a time) into blocks.
    fn with_tap(
        &self,
        (pred, target, grad): (u64, u64, u64),
        (per_image, unit): (usize, usize),
        (tap, criterion): (&TapTerm, Criterion),
        mut f: impl FnMut(pl_k_tap_loss_params, (u32, u32)) -> Result<()>,
    ) -> Result<()> {
        let n = self.call.io.shape.n;
        let split = BlockSplit::new(n, per_image / unit, BLOCK as usize, TAP_BLOCKS)?;
        let fro = criterion == Criterion::Fro;
        let criterion = criterion_id(criterion);
        // With parts asked for, each part is summed on its own (the loss
        // is their sum, written at the end of the call).
        let (loss, accumulate) = match self.call.io.parts {
            Some(parts) => (parts + 4 * tap.part as u64, tap.part_accumulate),
            None => (self.call.io.loss, tap.accumulate),
        };
        self.gpu.with_reduce(0, split.blocks(n), |mut reduce| {
            reduce.loss = loss as *mut f32;
            reduce.per_sample = self.call.io.per_sample.unwrap_or(0) as *mut f32;
            let p = pl_k_tap_loss_params {
                x: pred as *const _,
                target: target as *const _,
                // Fro's first launch reduces, the second writes the gradient.
                grad: if fro {
                    std::ptr::null_mut()
                } else {
                    grad as *mut _
                },
                norm_scale: self.opt(tap.norm) as *mut f32,
                reduce,
                n: n as i64,
                batch: self.call.batch as i64,
                per_image: per_image as i64,
                per_block: split.per_block as i64,
                blocks_per_image: split.blocks_per_image as i32,
                dtype: self.compute(),
                criterion,
                accumulate: accumulate as i32,
                weight: tap.weight as f32,
                accumulate_per_sample: !tap.first as i32,
                target_shared: self.kept.shared as i32,
            };
            f(p, split.grid)?;
            if fro && grad != 0 {
                f(
                    pl_k_tap_loss_params {
                        grad: grad as *mut _,
                        ..p
                    },
                    split.grid,
                )?;
            }
            Ok(())
        })
    }
}

/// Blocks in flight a tap aims for; fixed, so the loss bits depend only on the shape.
const TAP_BLOCKS: usize = 1024;

/// Elements per thread of the vectorised VGG passes (PL_VEC in kernels/common.cuh).
const VEC: usize = 8;

/// An error unless `c` channels split into whole [`VEC`]-channel vectors.
fn check_vec(c: usize) -> Result<()> {
    if c.is_multiple_of(VEC) {
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "{c} channels: the VGG passes need a multiple of {VEC}"
        )))
    }
}

/// The grid of a pass giving each thread [`VEC`] consecutive channels of
/// `count` elements with `c` channels.
fn vec_grid(count: usize, c: usize) -> Result<(u32, u32)> {
    check_vec(c)?;
    Ok(crate::cuda::grid_for(count / VEC))
}
