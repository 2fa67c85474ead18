//! Launchers of the backward steps (pred half only). The CPU reference of
//! each is named in its doc comment; `tests/backward.rs` compares them.

use super::{vec_grid, Exec};
use crate::cuda::abi::*;
use crate::cuda::{grid_for, kernel_dtype, Gpu};
use crate::error::Result;
use crate::ops::perceptual::cuda::convs::Convs;
use crate::ops::perceptual::cuda::schedule::*;
use crate::vgg::INPUT_CHANNELS;

impl ReluBackward {
    /// `pl_vgg_relu_backward`; reference: add `before`,
    /// `layers::relu_backward`, add `after`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.dims;
        let elems = x.call.io.shape.n * c * h * w;
        let p = pl_k_relu_backward_params {
            g: x.at(self.g) as *mut _,
            before: x.opt(self.relu.before) as *const _,
            mask: x.at(self.relu.mask) as *const u32,
            after: x.opt(self.relu.after) as *const _,
            count: elems as i64,
            dtype: x.compute(),
            reserved: 0,
        };
        x.kernel("pl_vgg_relu_backward", vec_grid(elems, c)?, &p)
    }
}

impl Unpool {
    /// `pl_vgg_unpool`; reference: add `before`, `layers::pool_backward`,
    /// then the ReLU before the pool as in [`ReluBackward`].
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let (c, h, w) = self.input;
        let n = x.call.io.shape.n;
        let relu = self.relu;
        let p = pl_k_unpool_params {
            gy: x.at(self.gy) as *const _,
            before: x.opt(self.before) as *const _,
            gx: x.at(self.gx) as *mut _,
            argmax: x.opt(self.argmax) as *const u32,
            relu_before: x.opt(relu.and_then(|r| r.before)) as *const _,
            mask: x.opt(relu.map(|r| r.mask)) as *const u32,
            after: x.opt(relu.and_then(|r| r.after)) as *const _,
            n: n as i64,
            h: h as i64,
            w: w as i64,
            c: c as i32,
            dtype: x.compute(),
        };
        x.kernel("pl_vgg_unpool", vec_grid(n * c * h * w, c)?, &p)
    }
}

impl ConvBackwardData {
    /// cuDNN (or, in the emulator tests, a direct convolution).
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let weight = x.net.weights.conv(self.layer)?.weight;
        // SAFETY: the layout's buffers hold the planned shapes.
        unsafe {
            x.convs
                .backward_data(self.layer, weight, x.at(self.dy), x.at(self.dx))
        }
    }
}

impl InputGrad {
    /// `pl_vgg_input_grad`; reference `cpu::input_grad`.
    pub(super) fn launch<G: Gpu, C: Convs>(&self, x: &Exec<'_, G, C>) -> Result<()> {
        let io = &x.call.io;
        let s = io.shape;
        let p = pl_k_input_grad_params {
            g: x.at(self.g) as *const _,
            grad: io.grad.unwrap_or(0) as *mut _,
            n: s.n as i64,
            h: s.h as i64,
            w: s.w as i64,
            c: s.c as i32,
            cpad: INPUT_CHANNELS as i32,
            g_dtype: x.compute(),
            out_dtype: kernel_dtype(io.dtype),
            scale: x.norm().0,
            beta: io.beta,
            reserved: 0,
            call: x.call.table as *const _,
        };
        x.kernel("pl_vgg_input_grad", grid_for(s.n * s.h * s.w), &p)
    }
}
