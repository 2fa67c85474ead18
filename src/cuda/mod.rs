//! CUDA plumbing shared by every loss, with no knowledge of any of them:
//! the embedded kernel images, the launch-parameter structs generated from
//! `kernels/pl_kernel_abi.h`, the [`Gpu`] trait the launchers queue work
//! through (a device stream, or the host emulator in the tests), cuDNN,
//! NVTX ranges and step timing. Each loss's launchers live with the loss
//! (`src/ops/<loss>/cuda.rs`).

#[rustfmt::skip]
#[allow(non_camel_case_types, non_upper_case_globals, dead_code, clippy::all)]
pub(crate) mod abi;
pub(crate) mod cudnn;
#[cfg(test)]
pub(crate) mod emulator;
pub(crate) mod nvtx;
pub(crate) mod step_times;

use crate::device::CudaDevice;
use crate::error::{Error, Result};

/// Whether the environment variable `name` is set to 1 (the switches of
/// the plan log, step times, algorithm timing and the test requirements).
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// For a unit test whose tool (a library, a compiler) is missing: reports
/// the skip, or fails when `require_var` is set to 1 (as CI sets it).
#[cfg(test)]
pub(crate) fn skip_unless_required(require_var: &str, why: &str) {
    assert!(!env_flag(require_var), "{require_var}=1 but {why}");
    crate::report_skip(why);
}
use crate::tensor::DType;
use abi::pl_k_reduce;
use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// One kernel family as embedded by build.rs: the nvcc fatbin when nvcc was
/// found at build time, and always the source for NVRTC.
pub(crate) struct KernelImage {
    pub name: &'static str,
    pub fatbin: Option<&'static [u8]>,
    pub source: &'static str,
}

pub(crate) mod kernels {
    use super::KernelImage;
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

// SAFETY: plain C structs of integers, floats and device addresses, laid
// out identically on host and device (bindgen's layout tests check it).
unsafe impl DeviceRepr for abi::pl_k_tv_params {}
unsafe impl DeviceRepr for abi::pl_k_feature_params {}
unsafe impl DeviceRepr for abi::pl_k_preprocess_params {}
unsafe impl DeviceRepr for abi::pl_k_bias_act_params {}
unsafe impl DeviceRepr for abi::pl_k_pool_params {}
unsafe impl DeviceRepr for abi::pl_k_bias_act_pool_params {}
unsafe impl DeviceRepr for abi::pl_k_bias_act_pool_tap_params {}
unsafe impl DeviceRepr for abi::pl_k_tap_loss_params {}
unsafe impl DeviceRepr for abi::pl_k_relu_backward_params {}
unsafe impl DeviceRepr for abi::pl_k_unpool_params {}
unsafe impl DeviceRepr for abi::pl_k_input_grad_params {}
unsafe impl DeviceRepr for abi::pl_k_check_params {}
unsafe impl DeviceRepr for abi::pl_k_gram_params {}
unsafe impl DeviceRepr for abi::pl_k_gram_sum_params {}
unsafe impl DeviceRepr for abi::pl_k_copy_params {}
unsafe impl DeviceRepr for abi::pl_k_gram_backward_params {}
unsafe impl DeviceRepr for abi::pl_k_parts_params {}
unsafe impl DeviceRepr for abi::pl_k_publish_params {}
unsafe impl DeviceRepr for abi::pl_k_call_table_params {}
unsafe impl DeviceRepr for abi::pl_k_lpips_tap_params {}
unsafe impl DeviceRepr for abi::pl_k_lpips_maps_params {}

/// Threads per block of every kernel (PL_BLOCK in kernels/common.cuh).
pub(crate) const BLOCK: u32 = 256;

/// The kernels' number for a dtype (`pl_k_dtype`).
pub(crate) fn kernel_dtype(dtype: DType) -> i32 {
    (match dtype {
        DType::F32 => abi::pl_k_dtype_PL_K_F32,
        DType::F16 => abi::pl_k_dtype_PL_K_F16,
        DType::BF16 => abi::pl_k_dtype_PL_K_BF16,
    }) as i32
}

/// What the launchers queue work on: a CUDA device's stream or, in the
/// tests, the host emulator of `emulator.rs`, which runs the same kernels on
/// the CPU.
pub(crate) trait Gpu {
    /// Launches kernel `symbol` of `image` on `grid` blocks of [`BLOCK`]
    /// threads, with `params` as its one argument.
    fn launch_symbol<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()>;

    /// Calls `f` with reduction scratch for `images` per-image scales and
    /// `partials` block partials, counter zero, held until `f` has queued
    /// its launches.
    fn with_reduce<R>(
        &self,
        images: usize,
        partials: usize,
        f: impl FnOnce(pl_k_reduce) -> Result<R>,
    ) -> Result<R>;

    /// Launches `{family}_{dtype}` of `image` with `params` as its one argument.
    fn launch<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        family: &str,
        dtype: DType,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        self.launch_symbol(image, &format!("{family}_{}", dtype.name()), grid, params)
    }
}

/// The most grid rows a launch may have; kernels stride over more images.
pub(crate) const MAX_GRID_Y: usize = 65535;

/// How a deterministic per-image reduction splits each of `n` images'
/// work units into blocks (grid x) over images (grid y, strided past
/// [`MAX_GRID_Y`]). Fixed by the shape alone, so the sums' order, and
/// with it the loss bits, depends on nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockSplit {
    /// Work units per block.
    pub per_block: usize,
    pub blocks_per_image: usize,
    /// (blocks per image, image rows) to launch.
    pub grid: (u32, u32),
}

impl BlockSplit {
    /// About `target_blocks` blocks over the batch, each of at least
    /// `min_units` units (fewer only when an image has fewer). Errors
    /// when the blocks cannot be counted by the kernels' 32-bit
    /// finishing counter.
    pub(crate) fn new(
        n: usize,
        units: usize,
        min_units: usize,
        target_blocks: usize,
    ) -> Result<Self> {
        let blocks = target_blocks
            .div_ceil(n)
            .min(units.div_ceil(min_units))
            .max(1);
        let per_block = units.div_ceil(blocks);
        // Recomputed so that no block is left without units.
        let blocks_per_image = units.div_ceil(per_block);
        if blocks_per_image.saturating_mul(n) > u32::MAX as usize {
            return Err(Error::shape(format!(
                "{n} images need {blocks_per_image} reduction blocks each, more than 2^32 in all; \
                 split the batch"
            )));
        }
        Ok(BlockSplit {
            per_block,
            blocks_per_image,
            grid: (blocks_per_image as u32, n.min(MAX_GRID_Y) as u32),
        })
    }

    /// Blocks over all `n` images (the reduction's partials).
    pub(crate) fn blocks(&self, n: usize) -> usize {
        self.blocks_per_image * n
    }
}

/// Blocks for a grid-stride pass over `count` elements: enough to fill any
/// current GPU, capped so each thread handles several elements.
pub(crate) fn grid_for(count: usize) -> (u32, u32) {
    (count.div_ceil(BLOCK as usize).clamp(1, 8192) as u32, 1)
}

impl Gpu for CudaDevice {
    fn launch_symbol<P: DeviceRepr + Copy>(
        &self,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        self.launch_on(self.stream(), image, symbol, grid, params)
    }

    fn with_reduce<R>(
        &self,
        images: usize,
        partials: usize,
        f: impl FnOnce(pl_k_reduce) -> Result<R>,
    ) -> Result<R> {
        let scratch = self.reduce_scratch(images, partials)?;
        f(scratch.reduce)
    }
}

impl CudaDevice {
    /// [`Gpu::launch_symbol`] on `stream`, a stream of this device.
    pub(crate) fn launch_on<P: DeviceRepr + Copy>(
        &self,
        stream: &Arc<CudaStream>,
        image: &KernelImage,
        symbol: &str,
        grid: (u32, u32),
        params: &P,
    ) -> Result<()> {
        let func = self.function(image, symbol)?;
        let cfg = LaunchConfig {
            grid_dim: (grid.0, grid.1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = stream.launch_builder(&func);
        builder.arg(params);
        // SAFETY: `params` matches the kernel's single by-value argument (the
        // shared header), and the caller validated every address and size in it.
        unsafe { builder.launch(cfg) }
            .map_err(|e| Error::cuda(&format!("launching {symbol}"), e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block gets units, the blocks cover the image, the count
    /// aims at the target, and a batch the 32-bit counter cannot count
    /// is a shape error rather than a wrapped counter.
    #[test]
    fn a_block_split_covers_each_image_and_fits_the_counter() {
        for (n, units, min_units, target) in [
            (1, 1, 1, 2048),
            (8, 3 * 256, 1, 2048),
            (3, 1000, 2048, 1024),
            (7, 12_345, 256, 1024),
            (100_000, 17, 256, 1024),
        ] {
            let s = BlockSplit::new(n, units, min_units, target).unwrap();
            assert!(s.per_block * s.blocks_per_image >= units, "covers");
            assert!(s.per_block * (s.blocks_per_image - 1) < units, "none empty");
            assert!(s.blocks_per_image <= target.div_ceil(n).max(1));
            assert_eq!(s.grid, (s.blocks_per_image as u32, n.min(65535) as u32));
        }
        // TV of 8 images of 3 x 256 rows at 2048 blocks: 256 blocks of 3 rows each.
        let tv = BlockSplit::new(8, 3 * 256, 1, 2048).unwrap();
        assert_eq!((tv.blocks_per_image, tv.per_block), (256, 3));
        let e = BlockSplit::new(1 << 33, 1, 1, 1024).unwrap_err();
        assert!(e.to_string().contains("more than 2^32"), "{e}");
        assert!(BlockSplit::new(u32::MAX as usize, 1, 1, 1024).is_ok());
    }
}
