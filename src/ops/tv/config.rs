//! The options of the total-variation loss: plain data that the loss, the
//! CPU reference and the CUDA launcher all read.

/// Which total-variation formula (the table in [`TvLoss`](crate::TvLoss)'s documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TvVariant {
    /// The seed article's `TV_Loss` exactly (always a batch mean).
    Article,
    /// Anisotropic L1 (piq `norm_type='l1'`).
    L1,
    /// Squared L2 (piq `norm_type='l2_squared'`).
    L2Squared,
    /// Per-image L2 norm of all differences (piq `norm_type='l2'`).
    L2,
    /// Per-pixel isotropic TV, sqrt(dh^2 + dw^2 + eps).
    Isotropic,
}

/// How per-image scores combine into the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Mean over the batch.
    Mean,
    /// Sum over the batch.
    Sum,
}

impl Reduction {
    /// The factor the sum of per-image scores is multiplied by.
    pub(crate) fn batch_scale(self, images: usize) -> f64 {
        match self {
            Reduction::Mean => 1.0 / images as f64,
            Reduction::Sum => 1.0,
        }
    }
}

/// Configuration of a [`TvLoss`](crate::TvLoss).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TvConfig {
    /// The formula; default [`TvVariant::Article`].
    pub variant: TvVariant,
    /// Batch reduction; default mean. `Article` accepts only `Mean`.
    pub reduction: Reduction,
    /// Multiplies the loss and gradient; default 1.
    pub weight: f32,
    /// Added inside the isotropic square root; default 0 (the gradient is
    /// then 0 where dh = dw = 0). Ignored by the other variants.
    pub eps: f32,
    /// Make a NaN or infinite input an error naming the first such element
    /// (one more pass over the input; on CUDA the call then waits for the
    /// device). Default off: non-finite values propagate.
    pub check_finite: bool,
}

impl Default for TvConfig {
    fn default() -> Self {
        TvConfig {
            variant: TvVariant::Article,
            reduction: Reduction::Mean,
            weight: 1.0,
            eps: 0.0,
            check_finite: false,
        }
    }
}

impl TvConfig {
    /// `variant` with a mean reduction and unit weight.
    pub fn new(variant: TvVariant) -> Self {
        TvConfig {
            variant,
            ..Default::default()
        }
    }
}
