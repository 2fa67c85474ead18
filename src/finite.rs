//! The opt-in input check of every loss (`check_finite`): an input holding
//! a NaN or an infinity is an error naming the input and the first such
//! element, instead of a NaN loss. On the CPU the inputs are scanned; on
//! CUDA `kernels/check.cu` finds the smallest such index per input, and
//! the call waits for the answer (the check costs one pass over each input
//! and a synchronisation, which is why it is opt-in).

use crate::cuda::abi::pl_k_check_params;
use crate::cuda::{grid_for, kernels, Gpu};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::tensor::{DType, Element, PerDType, Shape, Storage, TensorRef};

/// The index of the first non-finite element of `values`.
pub(crate) fn first_on_host<T: Element>(values: &[T]) -> Option<usize> {
    values.iter().position(|v| !v.to_f64().is_finite())
}

/// Queues the search over `count` elements of `dtype` at `x`, lowering the
/// u64 at `first` (which the caller set to `u64::MAX`) to the smallest
/// index of a non-finite element.
pub(crate) fn launch(gpu: &impl Gpu, x: u64, dtype: DType, count: usize, first: u64) -> Result<()> {
    let params = pl_k_check_params {
        x: x as *const _,
        first: first as *mut _,
        count: count as i64,
    };
    gpu.launch(
        &kernels::CHECK,
        "pl_first_nonfinite",
        dtype,
        grid_for(count),
        &params,
    )
}

/// The first of `inputs` (device addresses of `count` elements of
/// `dtype` each) holding a non-finite element: its position in `inputs`,
/// the element's index and its value. One search per input, one wait.
pub(crate) fn first_on_device(
    dev: &CudaDevice,
    inputs: &[u64],
    dtype: DType,
    count: usize,
) -> Result<Option<(usize, usize, f64)>> {
    use cudarc::driver::DevicePtr;
    let st = dev.stream();
    let none = vec![u64::MAX; inputs.len()];
    let slots = st
        .clone_htod(&none)
        .map_err(|e| Error::cuda_alloc("the finite check's results", 8 * none.len(), e))?;
    let base = slots.device_ptr(st).0;
    for (k, &x) in inputs.iter().enumerate() {
        launch(dev, x, dtype, count, base + 8 * k as u64)?;
    }
    let firsts = st
        .clone_dtoh(&slots)
        .map_err(|e| Error::cuda("reading the finite check", e))?;
    let Some((input, &first)) = firsts.iter().enumerate().find(|(_, &f)| f != u64::MAX) else {
        return Ok(None);
    };
    let x = inputs[input];
    // The offending value, for the message.
    let mut value = [0u8; 4];
    let bytes = &mut value[..dtype.size()];
    let at = x + first * dtype.size() as u64;
    dev.bind()?;
    // SAFETY: `at` is inside the checked input; `bytes` holds one element.
    unsafe {
        cudarc::driver::result::memcpy_dtoh_sync(bytes, at)
            .map_err(|e| Error::cuda("reading a non-finite value", e))?
    };
    Ok(Some((input, first as usize, element_value(dtype, &value))))
}

/// An element's value from its little-endian bytes.
fn element_value(dtype: DType, bytes: &[u8; 4]) -> f64 {
    struct Value<'a>(&'a [u8; 4]);
    impl crate::tensor::PerDType for Value<'_> {
        type Output = f64;
        fn run<T: Element>(self) -> f64 {
            // SAFETY: the bytes hold one T (at most 4 bytes), read unaligned.
            unsafe { std::ptr::read_unaligned(self.0.as_ptr().cast::<T>()) }.to_f64()
        }
    }
    dtype.dispatch(Value(bytes))
}

/// An error naming the first NaN or infinite element of `t` (input `name`),
/// wherever it lives; for a tensor checked outside a loss call (a kept
/// target).
pub(crate) fn check_tensor(device: &Device, t: &TensorRef<'_>, name: &str) -> Result<()> {
    struct OnHost<'a, 't>(&'a TensorRef<'t>);
    impl PerDType for OnHost<'_, '_> {
        type Output = Option<(usize, f64)>;
        fn run<T: Element>(self) -> Self::Output {
            let values = self.0.host_values::<T>()?;
            first_on_host(values).map(|i| (i, values[i].to_f64()))
        }
    }
    let s = t.shape;
    let first = match (device.cuda_device(), &t.storage) {
        (Some(dev), Storage::Cuda { ptr, .. }) => {
            first_on_device(dev, &[*ptr], t.dtype, s.numel()?)?
                .map(|(_, index, value)| (index, value))
        }
        _ => t.dtype.dispatch(OnHost(t)),
    };
    match first {
        Some((index, value)) => Err(error(name, s, index, value)),
        None => Ok(()),
    }
}

/// The error for input `name` of `shape`, non-finite (`value`) at `index`.
pub(crate) fn error(name: &str, shape: Shape, index: usize, value: f64) -> Error {
    let (hw, chw) = (shape.h * shape.w, shape.image_len());
    let (n, c) = (index / chw, index % chw / hw);
    let (i, j) = (index % hw / shape.w, index % shape.w);
    Error::arg(format!(
        "{name} holds a non-finite value ({value}) at element {index} \
         (image {n}, channel {c}, row {i}, column {j}), and check_finite is on"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::emulator::{addr, Emulator};
    use half::{bf16, f16};

    /// The kernel under the host emulator finds what the host scan finds:
    /// the first of several non-finite elements, or none.
    #[test]
    fn the_kernel_finds_the_first_non_finite_element() {
        let Some(emu) = Emulator::get() else { return };
        fn case<T: Element>(emu: &Emulator, len: usize, bad: &[(usize, f64)]) {
            let mut v: Vec<T> = (0..len)
                .map(|i| T::from_f64((i % 7) as f64 - 3.0))
                .collect();
            for &(i, x) in bad {
                v[i] = T::from_f64(x);
            }
            let mut first = u64::MAX;
            launch(emu, addr(&v), T::DTYPE, len, &mut first as *mut u64 as u64).unwrap();
            let got = (first != u64::MAX).then_some(first as usize);
            assert_eq!(got, first_on_host(&v), "{} {len} {bad:?}", T::DTYPE.name());
        }
        // Several blocks; the smallest index wins whatever the order.
        case::<f32>(
            emu,
            100_000,
            &[
                (99_999, f64::NAN),
                (70_001, f64::INFINITY),
                (70_002, f64::NAN),
            ],
        );
        case::<f32>(emu, 5000, &[]);
        case::<f16>(emu, 3000, &[(2999, f64::NEG_INFINITY)]);
        case::<bf16>(emu, 4096, &[(5, f64::NAN), (4000, f64::NAN)]);
        // 1e5 is beyond f16's range: rounded to infinity, found.
        case::<f16>(emu, 10, &[(3, 1e5)]);
    }

    #[test]
    fn the_message_places_the_element() {
        let e = error("pred", Shape::new(2, 3, 4, 5), 60 + 20 + 7, f64::NAN).to_string();
        assert!(
            e.contains("pred holds a non-finite value (NaN) at element 87 (image 1, channel 1, row 1, column 2)"),
            "{e}"
        );
    }
}
