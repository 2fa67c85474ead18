//! LPIPS's spatial map on CUDA. An ordinary LPIPS call's taps write each
//! pixel's term into a run of map terms per image (or take the terms'
//! gradient from one: `MapTerms`); `kernels/lpips.cu` resizes the terms
//! to the input's size and sums them, brings dL/dmap back to the terms
//! (the resize's adjoint), and takes each layer's mean. The CPU
//! references are `cpu::add_upsampled`, `cpu::upsampled_grad` and the
//! means in `Lpips::spatial`.

use super::LPIPS_TAPS;
use crate::cuda::abi::pl_k_lpips_maps_params;
use crate::cuda::{grid_for, kernels, Gpu, MAX_GRID_Y};
use crate::error::Result;
use crate::ops::perceptual::cuda::MapTerms;
use crate::vgg::{output_dims, Layer};

/// Where each LPIPS layer's terms lie in an image's run of map terms, for
/// an input of h x w: the layers one after the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TermLayout {
    /// Each layer's height and width.
    pub dims: [(usize, usize); 5],
    pub offsets: [usize; 5],
    /// Terms per image.
    pub stride: usize,
    /// The input's (the map's) height and width.
    pub input: (usize, usize),
}

impl TermLayout {
    /// The layout for inputs of `h` x `w` through `layers` (which hold
    /// every LPIPS tap: the spec checked it).
    pub(crate) fn new(layers: &[Layer], (h, w): (usize, usize)) -> TermLayout {
        let all = output_dims(layers, (3, h, w));
        let mut layout = TermLayout {
            dims: [(0, 0); 5],
            offsets: [0; 5],
            stride: 0,
            input: (h, w),
        };
        for (k, &tap) in LPIPS_TAPS.iter().enumerate() {
            let (_, lh, lw) = all[tap];
            layout.dims[k] = (lh, lw);
            layout.offsets[k] = layout.stride;
            layout.stride += lh * lw;
        }
        layout
    }

    /// The taps' view of terms at `values` (written) or `scales` (read).
    pub(crate) fn terms(&self, values: u64, scales: u64) -> MapTerms {
        MapTerms {
            values,
            scales,
            stride: self.stride,
            offsets: self.offsets,
        }
    }

    fn params(&self, (src, dst): (u64, u64), n: usize) -> pl_k_lpips_maps_params {
        pl_k_lpips_maps_params {
            src: src as *const f32,
            dst: dst as *mut f32,
            n: n as i64,
            h: self.input.0 as i64,
            w: self.input.1 as i64,
            map_stride: self.stride as i64,
            layer_h: self.dims.map(|d| d.0 as i64),
            layer_w: self.dims.map(|d| d.1 as i64),
            offset: self.offsets.map(|o| o as i64),
        }
    }
}

/// `map` (n x h x w f32) = the sum over layers of `terms` resized to the
/// input's size.
pub(crate) fn upsample<G: Gpu>(
    gpu: &G,
    at: &TermLayout,
    terms: u64,
    map: u64,
    n: usize,
) -> Result<()> {
    let p = at.params((terms, map), n);
    let grid = grid_for(n * at.input.0 * at.input.1);
    gpu.launch_symbol(&kernels::LPIPS, "pl_lpips_upsample", grid, &p)
}

/// `scales` (n x stride f32) = the adjoint of [`upsample`] applied to
/// `map_grad` (n x h x w f32): each term's gradient.
pub(crate) fn upsample_adjoint<G: Gpu>(
    gpu: &G,
    at: &TermLayout,
    map_grad: u64,
    scales: u64,
    n: usize,
) -> Result<()> {
    let p = at.params((map_grad, scales), n);
    gpu.launch_symbol(
        &kernels::LPIPS,
        "pl_lpips_upsample_adjoint",
        grid_for(n * at.stride),
        &p,
    )
}

/// `means` (n x 5 f32) = each image's mean term per layer: the per-layer
/// distances.
pub(crate) fn layer_means<G: Gpu>(
    gpu: &G,
    at: &TermLayout,
    terms: u64,
    means: u64,
    n: usize,
) -> Result<()> {
    let p = at.params((terms, means), n);
    let grid = (LPIPS_TAPS.len() as u32, n.min(MAX_GRID_Y) as u32);
    gpu.launch_symbol(&kernels::LPIPS, "pl_lpips_layer_means", grid, &p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::emulator::{addr, addr_mut, assert_close, values, Emulator};

    /// Layers of sizes that pools of odd inputs give, in one image's run.
    fn layout(input: (usize, usize)) -> TermLayout {
        let mut dims = [(0, 0); 5];
        let (mut h, mut w) = input;
        for d in &mut dims {
            *d = (h, w);
            (h, w) = (h / 2, w / 2);
        }
        let mut offsets = [0; 5];
        let mut stride = 0;
        for (o, (h, w)) in offsets.iter_mut().zip(dims) {
            *o = stride;
            stride += h * w;
        }
        TermLayout {
            dims,
            offsets,
            stride,
            input,
        }
    }

    /// The resize, its adjoint and the means against the CPU's float64
    /// ones, on sizes whose ratios are not powers of two; and the adjoint
    /// is the resize's: <up(t), g> = <t, adj(g)>.
    #[test]
    fn resize_adjoint_and_means_match_the_cpu() {
        let Some(emu) = Emulator::get() else { return };
        for (n, input) in [(2, (37, 45)), (1, (16, 16)), (3, (35, 18))] {
            let at = layout(input);
            let (h, w) = input;
            let terms: Vec<f32> = values(n * at.stride, 5);
            let g: Vec<f32> = values(n * h * w, 6);
            let mut map = vec![f32::NAN; n * h * w];
            let mut scales = vec![f32::NAN; n * at.stride];
            let mut means = vec![f32::NAN; n * 5];
            upsample(emu, &at, addr(&terms), addr_mut(&mut map), n).unwrap();
            upsample_adjoint(emu, &at, addr(&g), addr_mut(&mut scales), n).unwrap();
            layer_means(emu, &at, addr(&terms), addr_mut(&mut means), n).unwrap();

            let (mut want_map, mut want_scales, mut want_means) = (vec![], vec![], vec![]);
            for img in 0..n {
                let mut m = vec![0f64; h * w];
                let g_img: Vec<f64> = g[img * h * w..][..h * w]
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                for k in 0..5 {
                    let t =
                        &terms[img * at.stride + at.offsets[k]..][..at.dims[k].0 * at.dims[k].1];
                    let t: Vec<f64> = t.iter().map(|&v| v as f64).collect();
                    super::super::cpu::add_upsampled(&t, at.dims[k], &mut m, input);
                    let adj = super::super::cpu::upsampled_grad(&g_img, input, at.dims[k]).unwrap();
                    want_scales.extend(adj.iter().map(|&v| v as f32));
                    want_means.push((t.iter().sum::<f64>() / t.len() as f64) as f32);
                }
                want_map.extend(m.iter().map(|&v| v as f32));
            }
            let what = format!("{n} x {input:?}");
            assert_close(&format!("{what} map"), &map, &want_map, 1e-6);
            assert_close(&format!("{what} adjoint"), &scales, &want_scales, 1e-6);
            assert_close(&format!("{what} means"), &means, &want_means, 1e-6);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
            };
            let (lhs, rhs) = (dot(&map, &g), dot(&terms, &scales));
            assert!(
                (lhs - rhs).abs() <= 1e-5 * lhs.abs(),
                "{what}: {lhs} vs {rhs}"
            );
        }
    }
}
