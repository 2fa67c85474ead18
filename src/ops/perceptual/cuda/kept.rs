//! A kept target on a device: what the taps of later calls read in place
//! of the target's half of the batch. One forward over the target alone
//! (`Batch::Target`) fills it, slot by slot as the schedule lists them
//! ([`Schedule::kept`]): a perceptual tap's layer output in the compute
//! dtype, a style tap's Grams in f32.

use super::schedule::Schedule;
use super::steps::KeptAt;
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr};

/// The kept slots of a target of `images` images.
pub(crate) struct DeviceTarget {
    pub ordinal: usize,
    pub images: usize,
    /// By slot: its memory and bytes per image.
    slots: Vec<(CudaSlice<u8>, usize)>,
}

impl DeviceTarget {
    /// Unwritten slots for `images` images of the schedule `sched` (of a
    /// [`Batch::Target`] call) on `dev`.
    pub(crate) fn alloc(
        dev: &CudaDevice,
        sched: &Schedule,
        images: usize,
        value_bytes: usize,
    ) -> Result<DeviceTarget> {
        let slots = (sched.kept.iter())
            .map(|slot| {
                let per_image = slot.per_image.bytes(value_bytes);
                let bytes = per_image
                    .checked_mul(images)
                    .ok_or_else(|| Error::shape("the kept target's features do not fit"))?;
                // SAFETY: the target's forward writes every byte before a
                // call reads it.
                let mem = unsafe { dev.stream().alloc::<u8>(bytes.max(1)) }
                    .map_err(|e| Error::cuda_alloc("the kept target's features", bytes, e))?;
                Ok((mem, per_image))
            })
            .collect::<Result<_>>()?;
        Ok(DeviceTarget {
            ordinal: dev.ordinal(),
            images,
            slots,
        })
    }

    /// Where the slots are for a chunk from image `first` of a call on `dev`.
    pub(crate) fn at(&self, dev: &CudaDevice, first: usize) -> KeptAt {
        let slots = (self.slots.iter())
            .map(|(mem, per_image)| (mem.device_ptr(dev.stream()).0, *per_image));
        KeptAt::of(slots, self.images, first)
    }
}

impl Drop for DeviceTarget {
    /// Calls on any stream of the device may have queued reads of a kept
    /// target, so the whole device is waited for before it is freed
    /// (replacing or dropping one is rare; a call's own work is never
    /// waited for). A failed wait leaves the memory allocated rather than
    /// freed under a reader.
    fn drop(&mut self) {
        let Some((first, _)) = self.slots.first() else {
            return;
        };
        if first.context().synchronize().is_err() {
            for (mem, _) in self.slots.drain(..) {
                std::mem::forget(mem);
            }
        }
    }
}
