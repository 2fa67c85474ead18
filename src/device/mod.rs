//! Where a loss runs: the CPU, or one CUDA device and stream.
//!
//! 1. `Device::best()` picks CUDA device 0 when a driver and a device are
//!    present, else the CPU.
//! 2. `Device::cuda(ordinal)` runs on a new stream of its own;
//!    `Device::cuda_on_stream` runs on a stream the caller owns (PyTorch's
//!    current stream, say), so our work is ordered with the caller's.
//! 3. Clones share the stream, the compiled kernels and the scratch memory;
//!    kernels are loaded once per CUDA device per process, on first use.

mod cuda;

pub(crate) use cuda::{capture_forbids, CudaDevice};

use crate::error::{Error, Result};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// The kind of a [`Device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The host CPU (the reference backend).
    Cpu,
    /// An NVIDIA GPU through the CUDA driver.
    Cuda,
}

/// A backend to compute on. Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// The CPU backend: always available.
    pub fn cpu() -> Self {
        Device { inner: Inner::Cpu }
    }

    /// CUDA device `ordinal`, on a new non-blocking stream owned by this
    /// device. An error (never a panic) when no CUDA driver library or no
    /// such device is present.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Device {
            inner: Inner::Cuda(Arc::new(CudaDevice::new(ordinal, None)?)),
        })
    }

    /// CUDA device `ordinal`, queueing all work on the caller's stream
    /// (`std::ptr::null_mut()` means the legacy default stream).
    ///
    /// # Safety
    /// `stream` must be a stream of device `ordinal`'s primary context and
    /// stay valid for as long as this device or any clone of it is used.
    pub unsafe fn cuda_on_stream(
        ordinal: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<Self> {
        Ok(Device {
            inner: Inner::Cuda(Arc::new(CudaDevice::new(ordinal, Some(stream))?)),
        })
    }

    /// CUDA device 0 when it can be used, else the CPU.
    pub fn best() -> Self {
        Device::cuda(0).unwrap_or_else(|_| Device::cpu())
    }

    /// Whether this is the CPU or a CUDA device.
    pub fn kind(&self) -> DeviceKind {
        match self.inner {
            Inner::Cpu => DeviceKind::Cpu,
            Inner::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// The CUDA ordinal, `None` for the CPU.
    pub fn ordinal(&self) -> Option<usize> {
        self.cuda_device().map(|d| d.ordinal())
    }

    /// A human-readable name: "cpu" or the GPU's name.
    pub fn name(&self) -> String {
        match &self.inner {
            Inner::Cpu => "cpu".to_string(),
            Inner::Cuda(d) => d.name(),
        }
    }

    /// The stream this device queues work on, to allocate and copy buffers
    /// in the same order as the loss calls. `None` for the CPU.
    pub fn cuda_stream(&self) -> Option<&Arc<CudaStream>> {
        self.cuda_device().map(|d| d.stream())
    }

    /// Waits until all work queued on this device has finished; a no-op on the CPU.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            Inner::Cpu => Ok(()),
            Inner::Cuda(d) => d.synchronize(),
        }
    }

    pub(crate) fn cuda_device(&self) -> Option<&CudaDevice> {
        match &self.inner {
            Inner::Cpu => None,
            Inner::Cuda(d) => Some(d),
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            Inner::Cpu => write!(f, "Device::Cpu"),
            Inner::Cuda(d) => write!(f, "Device::Cuda({})", d.ordinal()),
        }
    }
}

/// Checks that CUDA is usable at all, before any cudarc call that would
/// panic on a missing library.
pub(crate) fn require_driver() -> Result<()> {
    // SAFETY: only probes whether the shared library can be opened.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NoCuda(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ))
    }
}
