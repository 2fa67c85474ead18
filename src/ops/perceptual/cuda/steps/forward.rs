//! Launchers of the forward steps. The CPU reference of each is named in
//! its doc comment (`cpu/` functions); `tests/forward.rs` and `tests/taps.rs` compare them.

use super::{check_vec, vec_grid, Exec, VEC};
use crate::cuda::abi::*;
use crate::cuda::{grid_for, kernel_dtype, Gpu};
use crate::error::{Error, Result};
use crate::ops::feature::Criterion;
use crate::ops::lpips::LinWeights;
use crate::ops::perceptual::cuda::convs::Convs;
use crate::ops::perceptual::cuda::schedule::*;
use crate::vgg::INPUT_CHANNELS;

impl Preprocess {
    /// `pl_vgg_preprocess`; reference `cpu::preprocess`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let io = &x.call.io;
        let s = io.shape;
        let (scale, shift) = x.norm();
        let p = pl_k_preprocess_params {
            pred: io.inputs[0] as *const _,
            target: if self.pairs { io.inputs[1] } else { 0 } as *const _,
            out: x.at(self.out) as *mut _,
            n: s.n as i64,
            h: s.h as i64,
            w: s.w as i64,
            c: s.c as i32,
            cpad: INPUT_CHANNELS as i32,
            in_dtype: kernel_dtype(io.dtype),
            out_dtype: x.compute(),
            scale,
            shift,
            call: x.call.table as *const _,
        };
        let images = if self.pairs { 2 * s.n } else { s.n };
        x.kernel("pl_vgg_preprocess", grid_for(images * s.h * s.w), &p)
    }
}

impl ConvForward {
    /// cuDNN (or, in the emulator tests, a direct convolution).
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let weight = x.net.weights.conv(self.layer)?.weight;
        // SAFETY: the layout's buffers hold the planned shapes.
        unsafe {
            x.convs.forward(
                self.layer,
                self.x.count,
                x.span(self.x),
                weight,
                x.span(self.y),
            )
        }
    }
}

impl BiasAct {
    /// `pl_vgg_bias_act`; reference `layers::add_bias` then `layers::relu`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let per_image = c * h * w;
        let p = pl_k_bias_act_params {
            x: x.span(self.x) as *mut _,
            bias: x.bias(self.bias)?,
            mask: x.opt(self.mask) as *mut u32,
            count: (self.x.count * per_image) as i64,
            pred_count: (self.pred * per_image) as i64,
            c: c as i32,
            dtype: x.compute(),
            relu: self.relu as i32,
            reserved: 0,
        };
        let grid = vec_grid(self.x.count * per_image, c)?;
        x.kernel("pl_vgg_bias_act", grid, &p)
    }
}

impl BiasActPool {
    /// `pl_vgg_bias_act_pool`; reference `layers::add_bias`, `layers::relu`
    /// then `layers::pool`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.input;
        let p = pl_k_bias_act_pool_params {
            x: x.span(self.x) as *const _,
            y: x.span(self.y) as *mut _,
            bias: x.bias(self.bias)?,
            mask: x.opt(self.mask) as *mut u32,
            argmax: x.opt(self.argmax) as *mut u32,
            images: self.x.count as i64,
            pred_images: self.pred as i64,
            h: h as i64,
            w: w as i64,
            c: c as i32,
            dtype: x.compute(),
            avg: x.avg(),
            reserved: 0,
        };
        let pooled = self.x.count * c * (h / 2) * (w / 2);
        x.kernel("pl_vgg_bias_act_pool", vec_grid(pooled, c)?, &p)
    }
}

impl BiasActPoolTap {
    /// `pl_vgg_bias_act_pool_tap`; reference `layers::add_bias`,
    /// `layers::relu`, then `layers::pool` and `feature::cpu::distance_sum`
    /// of the ReLU outputs.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.input;
        check_vec(c)?;
        if x.spec.criterion == Criterion::Fro {
            return Err(Error::Internal("a Fro tap in the fused pass".into()));
        }
        let inputs = (x.span(self.pred), x.span(self.target), x.opt(self.tap.grad));
        // A unit: 8 channels of a 2x2 window.
        x.with_tap(
            inputs,
            (c * h * w, 4 * VEC),
            (&self.tap, x.spec.criterion),
            |tap, grid| {
                let p = pl_k_bias_act_pool_tap_params {
                    tap,
                    y: x.span(self.y_pred) as *mut _,
                    y_target: self.y_target.map_or(0, |y| x.span(y)) as *mut _,
                    bias: x.bias(self.bias)?,
                    mask: x.opt(self.mask) as *mut u32,
                    argmax: x.opt(self.argmax) as *mut u32,
                    h: h as i64,
                    w: w as i64,
                    c: c as i32,
                    avg: x.avg(),
                    target_kept: self.y_target.is_none() as i32,
                    reserved: 0,
                };
                x.kernel("pl_vgg_bias_act_pool_tap", grid, &p)
            },
        )
    }
}

impl Keep {
    /// `pl_vgg_copy`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let count = self.x.count * c * h * w;
        let p = pl_k_copy_params {
            src: x.span(self.x) as *const _,
            dst: x.at(self.into) as *mut _,
            count: count as i64,
            dtype: x.compute(),
            reserved: 0,
        };
        x.kernel("pl_vgg_copy", vec_grid(count, c)?, &p)
    }
}

impl Pool {
    /// `pl_vgg_pool`; reference `layers::pool`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.input;
        let p = pl_k_pool_params {
            x: x.span(self.x) as *const _,
            y: x.span(self.y) as *mut _,
            argmax: x.opt(self.argmax) as *mut u32,
            images: self.x.count as i64,
            pred_images: self.pred as i64,
            h: h as i64,
            w: w as i64,
            c: c as i32,
            dtype: x.compute(),
            avg: x.avg(),
            reserved: 0,
        };
        let pooled = self.x.count * c * (h / 2) * (w / 2);
        x.kernel("pl_vgg_pool", grid_for(pooled), &p)
    }
}

impl TapLoss {
    /// `pl_vgg_tap_loss`, reference `feature::cpu::distance_sum`; or, for
    /// LPIPS, `pl_vgg_lpips_tap`, reference `lpips::cpu::tap_sum`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let inputs = (x.span(self.pred), x.span(self.target), x.opt(self.tap.grad));
        let tap = (&self.tap, x.spec.criterion);
        if x.spec.lpips.is_none() {
            return x.with_tap(inputs, (c * h * w, VEC), tap, |tap, grid| {
                x.kernel("pl_vgg_tap_loss", grid, &tap)
            });
        }
        if c % 32 != 0 || c > 512 {
            return Err(Error::Internal(format!("an LPIPS tap of {c} channels")));
        }
        // LPIPS's taps are the perceptual taps, in order.
        let k = (x.spec.taps.iter().position(|t| t.0 == self.layer))
            .ok_or_else(|| Error::Internal(format!("layer {} is no LPIPS tap", self.layer)))?;
        let lin = x.net.lpips + (LinWeights::offset(k) * 4) as u64;
        let terms = &x.call.terms;
        let map = terms.at(terms.values, k, h * w)?;
        let pixel_scale = terms.at(terms.scales, k, h * w)?;
        // The mean is over pixels; a work unit is one pixel.
        x.with_tap(inputs, (h * w, 1), tap, |tap, grid| {
            let p = pl_k_lpips_tap_params {
                tap,
                lin: lin as *const f32,
                map: map as *mut f32,
                pixel_scale: pixel_scale as *const f32,
                map_stride: terms.stride as i64,
                c: c as i32,
                reserved: 0,
            };
            x.kernel("pl_vgg_lpips_tap", grid, &p)
        })
    }
}
