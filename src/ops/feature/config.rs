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
}
