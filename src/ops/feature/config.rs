//! The options of the feature distance: plain data that the loss, the CPU
//! reference, the CUDA launchers and the perceptual loss's taps read.

/// The distance between features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Criterion {
    /// Mean squared error (default).
    #[default]
    Mse,
    /// Mean absolute error.
    Mae,
    /// The Frobenius norm of the whole batch's difference, sqrt(sum of
    /// squares) (BasicSR's `criterion='fro'`): not a mean, so a batch's
    /// value is not the mean of its images'. The perceptual loss's
    /// perceptual and style terms take it (on CUDA the batch runs in one
    /// chunk); the feature loss does not.
    Fro,
}
