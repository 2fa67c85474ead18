//! `pl_context`: one device and the stream calls through it are queued on.
//!
//! A CUDA context keeps one `Device` per caller stream it has been set to,
//! so switching back and forth (PyTorch moves between streams) reuses each
//! stream's reduction scratch and cuDNN handle. It keeps the current one
//! and the [`KEPT_STREAMS`] most recently used others; an older one is
//! released (its memory freed in stream order), and destroying the
//! context releases all but the current one, which the handles made from
//! the context may still be using.

use super::guard::guard;
use super::handle::{borrow, destroy, give, out_param, Handle};
use super::status::pl_status;
use crate::error::Error;
use crate::recent::Recent;
use crate::Device;
use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, RwLock};

/// Device kind for `pl_context_create`.
pub type pl_device_kind = i32;
/// The CPU backend; pointers are host memory.
pub const PL_DEVICE_CPU: pl_device_kind = 0;
/// A CUDA device; pointers are device memory.
pub const PL_DEVICE_CUDA: pl_device_kind = 1;

/// Streams besides the current one whose devices a context keeps.
pub(crate) const KEPT_STREAMS: usize = 8;

/// An opaque compute context: one device and its current stream.
pub struct pl_context {
    pub(crate) streams: Arc<Streams>,
}

impl Handle for pl_context {
    const NAME: &'static str = "pl_context";
}

/// A context's device on its current stream, shared with the handles made
/// from it, and the devices of recently used other streams.
pub(crate) struct Streams {
    /// The current device and the raw stream it was made for, read and
    /// replaced together so that concurrent switches cannot file a device
    /// under another stream.
    current: RwLock<(usize, Device)>,
    recent: Mutex<Recent<(usize, Device)>>,
}

impl Streams {
    fn new(device: Device) -> Arc<Self> {
        Arc::new(Streams {
            current: RwLock::new((stream_of(&device), device)),
            recent: Mutex::new(Recent::new(KEPT_STREAMS)),
        })
    }

    /// The device on the current stream.
    pub(crate) fn current(&self) -> Result<Device, Error> {
        self.current
            .read()
            .map(|c| c.1.clone())
            .map_err(|_| Error::poisoned())
    }

    /// Makes `stream` current: its kept device, or `make()`'s. The device
    /// it replaces is kept among the recent ones.
    fn switch(
        &self,
        stream: usize,
        make: impl FnOnce() -> Result<Device, Error>,
    ) -> Result<(), Error> {
        let mut recent = self.recent.lock().map_err(|_| Error::poisoned())?;
        let mut current = self.current.write().map_err(|_| Error::poisoned())?;
        if stream == current.0 {
            return Ok(());
        }
        let next = recent
            .take(|(s, _)| *s == stream)
            .map_or_else(make, |(_, d)| Ok(d))?;
        let previous = std::mem::replace(&mut *current, (stream, next));
        // A device whose scratch a CUDA graph captured stays alive: the
        // graph holds its addresses.
        recent.push_keeping(previous, |(_, d)| {
            d.cuda_device().is_some_and(|c| c.captured())
        });
        Ok(())
    }

    /// Releases every kept device but the current one.
    fn forget(&self) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.clear();
        }
    }
}

/// The raw stream a device queues on (0 for the CPU or the legacy default).
fn stream_of(device: &Device) -> usize {
    device.cuda_stream().map_or(0, |s| s.cu_stream() as usize)
}

/// Creates a context on the CPU (`ordinal` and `cuda_stream` ignored) or on
/// CUDA device `ordinal`. For CUDA, `cuda_stream` is a `CUstream` /
/// `cudaStream_t` of that device's primary context that all work is queued
/// on (it must outlive the context and the handles made from it), or NULL
/// for the legacy default stream.
///
/// # Safety
/// `out` must be NULL or point to writable storage for a pointer;
/// `cuda_stream` must be NULL or a valid stream as described.
#[no_mangle]
pub unsafe extern "C" fn pl_context_create(
    kind: pl_device_kind,
    ordinal: c_int,
    cuda_stream: *mut c_void,
    out: *mut *mut pl_context,
) -> pl_status {
    guard(|| {
        let out = out_param(out, "out")?;
        let device = match kind {
            PL_DEVICE_CPU => Device::cpu(),
            PL_DEVICE_CUDA => {
                let ordinal = usize::try_from(ordinal)
                    .map_err(|_| Error::arg(format!("CUDA ordinal {ordinal} is negative")))?;
                Device::cuda_on_stream(ordinal, cuda_stream.cast())?
            }
            _ => return Err(Error::arg(format!("unknown pl_device_kind {kind}"))),
        };
        give(
            pl_context {
                streams: Streams::new(device),
            },
            out,
        );
        Ok(())
    })
}

/// Destroys a context; NULL is accepted and ignored. Work already queued
/// finishes on its stream. The devices of streams other than the current
/// one are released now; the current one lives on while handles made from
/// the context (VGG weights, losses) do.
///
/// # Safety
/// `ctx` must be NULL or a context from `pl_context_create`, not used again.
#[no_mangle]
pub unsafe extern "C" fn pl_context_destroy(ctx: *mut pl_context) {
    destroy(ctx);
}

impl Drop for pl_context {
    /// Handles made from the context hold `streams` too; the devices of
    /// other streams are released now rather than when the last goes.
    fn drop(&mut self) {
        self.streams.forget();
    }
}

/// Waits until all work queued on the context's current stream has finished.
///
/// # Safety
/// `ctx` must be NULL or a live context.
#[no_mangle]
pub unsafe extern "C" fn pl_context_synchronize(ctx: *mut pl_context) -> pl_status {
    guard(|| borrow(ctx, "ctx")?.streams.current()?.synchronize())
}

/// Makes `cuda_stream` (a `CUstream` / `cudaStream_t` of the context's
/// device, or NULL for the legacy default stream) the stream all later
/// calls through this context and the handles made from it are queued on,
/// for example PyTorch's current stream. Work already queued stays on its
/// stream. The context keeps the resources of the 8 most recently used
/// other streams and releases older ones. A CPU context accepts only NULL.
/// The stream is the context's, for every thread that uses it and every
/// handle made from it: threads working on different streams at once each
/// need their own context (and VGG and losses made from it), or must
/// serialise switching and calling.
///
/// # Safety
/// `ctx` must be a live context; the stream must stay valid until the
/// context and every handle made from it are destroyed: memory a call
/// allocates on a stream (VGG weights at `pl_vgg_load`, a loss's buffers
/// for an input shape) is freed in that stream's order, whenever it is
/// released. (PyTorch's pooled streams are never destroyed.)
#[no_mangle]
pub unsafe extern "C" fn pl_context_set_stream(
    ctx: *mut pl_context,
    cuda_stream: *mut c_void,
) -> pl_status {
    guard(|| {
        let streams = &borrow(ctx, "ctx")?.streams;
        let current = streams.current()?;
        let Some(ordinal) = current.ordinal() else {
            return match cuda_stream.is_null() {
                true => Ok(()),
                false => Err(Error::arg("a CPU context has no CUDA stream")),
            };
        };
        streams.switch(cuda_stream as usize, || {
            Device::cuda_on_stream(ordinal, cuda_stream.cast())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Switching among streams keeps the current device and at most
    /// KEPT_STREAMS others, makes a device only for a stream not kept, and
    /// `forget` releases all but the current one. (CPU devices stand in
    /// for CUDA ones: the bookkeeping is the same.)
    #[test]
    fn the_stream_cache_forgets() {
        let streams = Streams::new(Device::cpu());
        let mut made = Vec::new();
        let switch = |streams: &Streams, to: usize, made: &mut Vec<usize>| {
            streams
                .switch(to, || {
                    made.push(to);
                    Ok(Device::cpu())
                })
                .unwrap();
        };
        for stream in 1..=20 {
            switch(&streams, stream, &mut made);
        }
        assert_eq!(made, (1..=20).collect::<Vec<_>>());
        assert_eq!(streams.recent.lock().unwrap().len(), KEPT_STREAMS);
        // 19 down to 12 are kept (12 = 20 - KEPT_STREAMS): no new device.
        switch(&streams, 12, &mut made);
        switch(&streams, 20, &mut made);
        assert_eq!(made.len(), 20);
        // 11 was released: it is made again.
        switch(&streams, 11, &mut made);
        assert_eq!(made.len(), 21);
        switch(&streams, 11, &mut made);
        assert_eq!(made.len(), 21, "the current stream is not made again");
        streams.forget();
        assert_eq!(streams.recent.lock().unwrap().len(), 0);
    }

    #[test]
    fn a_cpu_context_takes_only_the_null_stream() {
        let mut ctx = std::ptr::null_mut();
        unsafe {
            assert_eq!(
                pl_context_create(PL_DEVICE_CPU, 0, std::ptr::null_mut(), &mut ctx),
                0
            );
            assert_eq!(pl_context_set_stream(ctx, std::ptr::null_mut()), 0);
            assert_ne!(pl_context_set_stream(ctx, 8 as *mut c_void), 0);
            let context = &*ctx;
            assert_eq!(context.streams.recent.lock().unwrap().len(), 0);
            pl_context_destroy(ctx);
        }
    }
}
