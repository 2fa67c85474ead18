//! LPIPS's spatial map (`lpips.LPIPS(spatial=True)`), its per-layer
//! distances (`retPerLayer=True`) and the map's gradient, on both
//! backends. The CPU computes each image's per-pixel terms with the
//! network on the host (`perceptual::cpu::lpips_maps`); on CUDA an
//! ordinary LPIPS call's taps write them to device memory, and
//! `cuda.rs`'s kernels resize and sum them or bring dL/dmap back.

use super::cpu;
use super::cuda::{self as kernels, TermLayout};
use super::Lpips;
use crate::backend::{check_disjoint, device_span, DeviceIo, Span};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::ops::perceptual::cpu::HostNet;
use crate::tensor::{DType, Shape, TensorMut, TensorRef};
use cudarc::driver::{CudaSlice, DevicePtr};

/// Why a CPU network's map cannot use an input or output.
fn on_host() -> Error {
    Error::DeviceMismatch("LPIPS maps on a CPU network take and give host memory".into())
}

impl Lpips {
    /// The spatial map and per-layer distances of `pred` against `target`
    /// (same shape and dtype), as `lpips.LPIPS(spatial=True)` and
    /// `retPerLayer=True` give them: per image, each layer's per-pixel
    /// terms bilinearly resized to H x W (align_corners=False) and summed,
    /// and each layer's mean. The weight is applied; no gradient. The
    /// inputs are on the network's device (host memory on the CPU, device
    /// memory on CUDA, where the result is copied back, waiting for the
    /// device); [`spatial_into`](Self::spatial_into) leaves it there.
    pub fn spatial(&self, pred: &TensorRef<'_>, target: &TensorRef<'_>) -> Result<LpipsMaps> {
        self.check_maps(pred, target)?;
        let Some(dev) = self.vgg().device().cuda_device() else {
            self.check_finite(self.vgg().device(), pred, target)?;
            return pred.dtype.dispatch(Maps {
                lpips: self,
                pred,
                target,
            });
        };
        let s = pred.shape;
        refuse_capture(dev)?;
        let mut map = alloc(dev, s.n * s.h * s.w, "the LPIPS map")?;
        let mut layers = alloc(dev, s.n * 5, "the LPIPS layer distances")?;
        self.spatial_into(
            pred,
            target,
            TensorMut::cuda(&mut map, Shape::new(s.n, 1, s.h, s.w))?,
            Some(TensorMut::cuda(&mut layers, Shape::new(s.n, 5, 1, 1))?),
        )?;
        let read = |t: &CudaSlice<f32>| {
            (dev.stream().clone_dtoh(t)).map_err(|e| Error::cuda("reading the LPIPS map", e))
        };
        let (map, layers) = (read(&map)?, read(&layers)?);
        dev.synchronize()?;
        Ok(LpipsMaps {
            map,
            layers: (layers.chunks_exact(5))
                .map(|l| [l[0], l[1], l[2], l[3], l[4]])
                .collect(),
        })
    }

    /// [`spatial`](Self::spatial) into `map` (f32, N x 1 x H x W or any
    /// shape of N*H*W values) and, when given, `layers` (f32, N*5 values,
    /// image by image), on the network's device and stream.
    pub fn spatial_into(
        &self,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        map: TensorMut<'_>,
        layers: Option<TensorMut<'_>>,
    ) -> Result<()> {
        self.spatial_into_on(self.vgg().device(), pred, target, map, layers)
    }

    /// [`spatial_into`](Self::spatial_into) on another stream of the
    /// network's device. On CUDA the work is queued, not waited for
    /// (except what any call may wait for: the first call on a device
    /// uploads the lin weights, a new shape builds its plan, and
    /// `check_finite` reads its result); each call allocates its
    /// per-pixel terms (4 bytes per pixel of the five layers, about 1.33 H
    /// W per image) and frees them in stream order, so it cannot be
    /// captured in a CUDA graph.
    pub fn spatial_into_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        mut map: TensorMut<'_>,
        mut layers: Option<TensorMut<'_>>,
    ) -> Result<()> {
        self.loss.check_device(device)?;
        self.check_maps(pred, target)?;
        let s = pred.shape;
        check_f32(map.dtype(), map.shape(), s.n * s.h * s.w, "map")?;
        if let Some(l) = &layers {
            check_f32(l.dtype(), l.shape(), s.n * 5, "layers")?;
        }
        let Some(dev) = device.cuda_device() else {
            let maps = self.spatial(pred, target)?;
            (map.host_values::<f32>().ok_or_else(on_host)?).copy_from_slice(&maps.map);
            if let Some(l) = layers.as_mut() {
                let out = l.host_values::<f32>().ok_or_else(on_host)?;
                out.iter_mut()
                    .zip(maps.layers.iter().flatten())
                    .for_each(|(o, &v)| *o = v);
            }
            return Ok(());
        };
        let inputs = [
            device_span(dev, &pred.storage, pred.dtype, s, "pred")?,
            device_span(dev, &target.storage, target.dtype, s, "target")?,
        ];
        let mut outputs = vec![device_span(
            dev,
            &map.storage,
            DType::F32,
            map.shape(),
            "map",
        )?];
        if let Some(l) = &layers {
            outputs.push(device_span(
                dev,
                &l.storage,
                DType::F32,
                l.shape(),
                "layers",
            )?);
        }
        let call = self.device_call(device, dev, (pred, target), (&inputs, &outputs))?;
        let (at, terms_at) = (&call.layout, addr(dev, &call.terms));
        let io = call.io(pred, &inputs, dev, None);
        self.loss
            .queue_with_terms(dev, &io, at.terms(terms_at, 0))?;
        kernels::upsample(dev, at, terms_at, outputs[0].0, s.n)?;
        if let Some(l) = outputs.get(1) {
            kernels::layer_means(dev, at, terms_at, l.0, s.n)?;
        }
        Ok(())
    }

    /// The gradient w.r.t. `pred` of the spatial map
    /// [`spatial`](Self::spatial) gives, from `map_grad` (f32, N x 1 x H x
    /// W or any shape of N*H*W values: the gradient of the map, as
    /// autograd's backward of `lpips.LPIPS(spatial=True)` receives it),
    /// written into `grad` (pred's shape and dtype), all on the network's
    /// device. 0 at a pixel whose features are all 0, as for the distance.
    pub fn spatial_backward(
        &self,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        map_grad: &TensorRef<'_>,
        grad: TensorMut<'_>,
    ) -> Result<()> {
        self.spatial_backward_on(self.vgg().device(), pred, target, map_grad, grad)
    }

    /// [`spatial_backward`](Self::spatial_backward) on another stream of
    /// the network's device; on CUDA as
    /// [`spatial_into_on`](Self::spatial_into_on) (queued, not waited for;
    /// scratch allocated per call). On the CPU `grad` is written after
    /// everything is computed; on CUDA it must not overlap an input.
    pub fn spatial_backward_on(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
        map_grad: &TensorRef<'_>,
        mut grad: TensorMut<'_>,
    ) -> Result<()> {
        self.loss.check_device(device)?;
        self.check_maps(pred, target)?;
        let s = pred.shape;
        check_f32(
            map_grad.dtype,
            map_grad.shape,
            s.n * s.h * s.w,
            "the map's gradient",
        )?;
        if grad.shape() != s || grad.dtype() != pred.dtype {
            return Err(Error::arg(format!(
                "grad must have pred's shape and dtype ({} {s}), got {} {}",
                pred.dtype.name(),
                grad.dtype().name(),
                grad.shape()
            )));
        }
        let Some(dev) = device.cuda_device() else {
            self.check_finite(device, pred, target)?;
            let map_grad = map_grad.host_values::<f32>().ok_or_else(on_host)?;
            return pred.dtype.dispatch(MapGrad {
                lpips: self,
                pred,
                target,
                map_grad,
                grad: &mut grad,
            });
        };
        let inputs = [
            device_span(dev, &pred.storage, pred.dtype, s, "pred")?,
            device_span(dev, &target.storage, target.dtype, s, "target")?,
            device_span(
                dev,
                &map_grad.storage,
                DType::F32,
                map_grad.shape,
                "map_grad",
            )?,
        ];
        let out = device_span(dev, &grad.storage, grad.dtype(), s, "grad")?;
        let call = self.device_call(device, dev, (pred, target), (&inputs, &[out]))?;
        let (at, scales_at) = (&call.layout, addr(dev, &call.terms));
        kernels::upsample_adjoint(dev, at, inputs[2].0, scales_at, s.n)?;
        let io = call.io(pred, &inputs, dev, Some(out.0));
        self.loss.queue_with_terms(dev, &io, at.terms(0, scales_at))
    }

    /// What a map call on CUDA shares before its work: no output over an
    /// input, no capture, finite inputs when asked; then the terms'
    /// layout and scratch (the terms, or their gradient) and the
    /// distance's.
    fn device_call(
        &self,
        device: &Device,
        dev: &CudaDevice,
        (pred, target): (&TensorRef<'_>, &TensorRef<'_>),
        (inputs, outputs): (&[Span<'_>], &[Span<'_>]),
    ) -> Result<DeviceCall> {
        check_disjoint(inputs, outputs)?;
        refuse_capture(dev)?;
        self.check_finite(device, pred, target)?;
        let s = pred.shape;
        let layout = TermLayout::new(self.vgg().layers(), (s.h, s.w));
        Ok(DeviceCall {
            terms: alloc(dev, s.n * layout.stride, "the LPIPS map's terms")?,
            loss: alloc(dev, 1, "the LPIPS distance")?,
            layout,
        })
    }

    /// With `check_finite`, an error naming the first NaN or infinity of
    /// pred or target (waiting for the device on CUDA), as a loss call's.
    fn check_finite(
        &self,
        device: &Device,
        pred: &TensorRef<'_>,
        target: &TensorRef<'_>,
    ) -> Result<()> {
        if self.loss.spec().check_finite {
            crate::finite::check_tensor(device, pred, "pred")?;
            crate::finite::check_tensor(device, target, "target")?;
        }
        Ok(())
    }

    /// An error unless `pred` and `target` can be mapped.
    fn check_maps(&self, pred: &TensorRef<'_>, target: &TensorRef<'_>) -> Result<()> {
        let s = pred.shape;
        if target.shape != s || target.dtype != pred.dtype {
            return Err(Error::arg(format!(
                "pred and target must have one shape and dtype, got {} {s} and {} {}",
                pred.dtype.name(),
                target.dtype.name(),
                target.shape
            )));
        }
        s.numel()?;
        self.loss.check_shape(s)
    }
}

/// An error unless an f32 buffer of `shape` holds `floats` values.
fn check_f32(dtype: DType, shape: Shape, floats: usize, what: &str) -> Result<()> {
    if dtype != DType::F32 || shape.numel()? != floats {
        return Err(Error::arg(format!(
            "{what} must be f32 with {floats} values, got {} {shape}",
            dtype.name()
        )));
    }
    Ok(())
}

/// A map call's scratch on CUDA, freed in stream order when dropped.
struct DeviceCall {
    layout: TermLayout,
    /// n x stride f32: the terms, or their gradient.
    terms: CudaSlice<f32>,
    /// The distance the LPIPS call under the map reduces to (unused).
    loss: CudaSlice<f32>,
}

impl DeviceCall {
    /// The LPIPS call under the map: pred against target (the first two
    /// `inputs`), the distance into scratch, the gradient into `grad` when
    /// given.
    fn io(
        &self,
        pred: &TensorRef<'_>,
        inputs: &[Span<'_>],
        dev: &CudaDevice,
        grad: Option<u64>,
    ) -> DeviceIo<2> {
        DeviceIo {
            shape: pred.shape,
            dtype: pred.dtype,
            inputs: [inputs[0].0, inputs[1].0],
            grad,
            beta: 0.0,
            loss: addr(dev, &self.loss),
            per_sample: None,
            parts: None,
        }
    }
}

/// Maps allocate per call, which a stream capture must not see.
fn refuse_capture(dev: &CudaDevice) -> Result<()> {
    dev.refuse_in_capture(|| {
        "LPIPS maps allocate scratch on each call (do not capture them)".into()
    })
}

/// `floats` f32 of device scratch, zeroed.
fn alloc(dev: &CudaDevice, floats: usize, what: &str) -> Result<CudaSlice<f32>> {
    (dev.stream().alloc_zeros::<f32>(floats.max(1)))
        .map_err(|e| Error::cuda_alloc(what, 4 * floats, e))
}

fn addr(dev: &CudaDevice, s: &CudaSlice<f32>) -> u64 {
    s.device_ptr(dev.stream()).0
}

/// The network on the host and pred's and target's elements, for the
/// CPU's maps.
fn host_pair<'a, T: crate::tensor::Element>(
    lpips: &'a Lpips,
    pred: &'a TensorRef<'_>,
    target: &'a TensorRef<'_>,
) -> Result<(HostNet<'a>, &'a [T], &'a [T])> {
    let vgg = lpips.vgg();
    let net = HostNet {
        layers: vgg.layers(),
        weights: vgg.host_weights()?,
    };
    let pred = pred.host_values::<T>().ok_or_else(on_host)?;
    Ok((net, pred, target.host_values::<T>().ok_or_else(on_host)?))
}

/// What [`Lpips::spatial`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LpipsMaps {
    /// N x H x W: each image's map, the sum of its layers' resized maps.
    pub map: Vec<f32>,
    /// Per image, each layer's distance (the mean of its map); their sum
    /// is the image's distance.
    pub layers: Vec<[f32; 5]>,
}

/// [`Lpips::spatial`] in the inputs' element type.
struct Maps<'a, 't> {
    lpips: &'a Lpips,
    pred: &'a TensorRef<'t>,
    target: &'a TensorRef<'t>,
}

impl crate::tensor::PerDType for Maps<'_, '_> {
    type Output = Result<LpipsMaps>;

    fn run<T: crate::tensor::Element>(self) -> Result<LpipsMaps> {
        let (net, pred, target) = host_pair::<T>(self.lpips, self.pred, self.target)?;
        let (s, spec) = (self.pred.shape, self.lpips.loss.spec());
        let weight = spec.weight;
        let (image, hw) = (s.image_len(), s.h * s.w);
        let mut out = LpipsMaps {
            map: Vec::with_capacity(s.n * hw),
            layers: Vec::with_capacity(s.n),
        };
        for n in 0..s.n {
            let r = n * image..(n + 1) * image;
            let images = (&pred[r.clone()], &target[r]);
            let maps = crate::ops::perceptual::cpu::lpips_maps(net, spec, images, (s.c, s.h, s.w))?;
            let mut map = vec![0.0f64; hw];
            let mut layers = [0f32; 5];
            for (k, (values, dims)) in maps.iter().enumerate() {
                cpu::add_upsampled(values, *dims, &mut map, (s.h, s.w));
                layers[k] = (weight * values.iter().sum::<f64>() / values.len() as f64) as f32;
            }
            out.map.extend(map.iter().map(|&v| (weight * v) as f32));
            out.layers.push(layers);
        }
        Ok(out)
    }
}

/// [`Lpips::spatial_backward`] in the inputs' element type.
struct MapGrad<'a, 't, 'g> {
    lpips: &'a Lpips,
    pred: &'a TensorRef<'t>,
    target: &'a TensorRef<'t>,
    map_grad: &'a [f32],
    grad: &'a mut TensorMut<'g>,
}

impl crate::tensor::PerDType for MapGrad<'_, '_, '_> {
    type Output = Result<()>;

    fn run<T: crate::tensor::Element>(self) -> Result<()> {
        let (net, pred, target) = host_pair::<T>(self.lpips, self.pred, self.target)?;
        let (s, spec) = (self.pred.shape, self.lpips.loss.spec());
        let (image, hw) = (s.image_len(), s.h * s.w);
        // Computed whole before any of `grad` is written.
        let mut values = crate::fallible::filled(s.n * image, 0.0f64, "the map's input gradient")?;
        for n in 0..s.n {
            let r = n * image..(n + 1) * image;
            let images = (&pred[r.clone()], &target[r.clone()]);
            let mut g = crate::fallible::filled(hw, 0.0f64, "the map's gradient")?;
            (g.iter_mut().zip(&self.map_grad[n * hw..(n + 1) * hw]))
                .for_each(|(g, &v)| *g = spec.weight * v as f64);
            let dims = (s.c, s.h, s.w);
            crate::ops::perceptual::cpu::lpips_map_grad(
                net,
                spec,
                images,
                dims,
                &g,
                &mut values[r],
            )?;
        }
        let out = self.grad.host_values::<T>().ok_or_else(on_host)?;
        out.iter_mut()
            .zip(&values)
            .for_each(|(o, &v)| *o = T::from_f64(v));
        Ok(())
    }
}
