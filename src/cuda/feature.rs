//! Launcher for kernels/feature.cu.

use super::abi::pl_k_feature_params;
use super::{kernel_dtype, kernels, launch, BLOCK};
use crate::device::CudaDevice;
use crate::error::Result;
use crate::loss::feature::FeatureCall;

/// Elements per thread the grid aims for, and its cap; both fixed so the
/// reduction order depends only on the element count.
const ELEMS_PER_THREAD: usize = 8;
const MAX_BLOCKS: usize = 1024;

pub(crate) fn feature(dev: &CudaDevice, call: &FeatureCall) -> Result<()> {
    let _range = super::nvtx::range(|| format!("feature {:?} {}", call.criterion, call.count));
    let blocks = call
        .count
        .div_ceil(BLOCK as usize * ELEMS_PER_THREAD)
        .clamp(1, MAX_BLOCKS);
    let ws = dev.workspace(0, blocks)?;
    let mut reduce = ws.reduce;
    reduce.loss = call.loss as *mut f32;
    let params = pl_k_feature_params {
        a: call.a as *const _,
        b: call.b as *const _,
        grad: call.grad.unwrap_or(0) as *mut _,
        reduce,
        count: call.count as i64,
        dtype: kernel_dtype(call.dtype),
        criterion: call.criterion.kernel_id(),
        weight: call.weight,
        beta: call.beta,
    };
    launch(
        dev,
        &kernels::FEATURE,
        "pl_feature",
        call.dtype,
        (blocks as u32, 1),
        &params,
    )
}
