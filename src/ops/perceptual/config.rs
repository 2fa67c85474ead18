//! The options of the perceptual loss, and [`PerceptualSpec`]: the options
//! resolved against a loaded network, which is what both backends read.

use crate::error::{Error, Result};
use crate::ops::check_weight;
use crate::ops::feature::Criterion;
use crate::vgg::{Module, Pooling, Vgg};

/// A tapped module: by torchvision index or by name (`"relu3_3"`, `"conv5_4"`, `"pool2"`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Module index in `features`.
    Index(usize),
    /// Module name.
    Name(String),
}

impl From<usize> for Tap {
    fn from(i: usize) -> Self {
        Tap::Index(i)
    }
}

impl From<&str> for Tap {
    fn from(s: &str) -> Self {
        Tap::Name(s.to_string())
    }
}

/// How inputs are normalised before VGG.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum InputNorm {
    /// Used as given (the article's default).
    #[default]
    None,
    /// ImageNet mean/std for inputs in [0, 1].
    Imagenet,
    /// Inputs in [-1, 1]: mapped by (x + 1) / 2, then ImageNet mean/std.
    ImagenetFromPm1,
    /// Inputs in [-1, 1] mapped by (x + 1) / 2 only (BasicSR's
    /// `range_norm` without `use_input_norm`).
    FromPm1,
    /// LPIPS's ScalingLayer for inputs in [-1, 1]: (x - shift) / scale
    /// with shift [-.030, -.088, -.188], scale [.458, .448, .450].
    LpipsScaling,
    /// The same for inputs in [0, 1], mapped to [-1, 1] first by 2x - 1
    /// (LPIPS's `normalize=True`).
    LpipsScalingFromUnit,
}

/// ImageNet's per-channel mean and standard deviation (RGB).
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];
/// LPIPS's ScalingLayer (ImageNet's, rewritten for inputs in [-1, 1]).
const LPIPS_SHIFT: [f64; 3] = [-0.030, -0.088, -0.188];
const LPIPS_SCALE: [f64; 3] = [0.458, 0.448, 0.450];

impl InputNorm {
    /// (scale, shift) with normalised = x * scale + shift, for channel `c`.
    pub(crate) fn affine(self, c: usize) -> (f64, f64) {
        match self {
            InputNorm::None => (1.0, 0.0),
            InputNorm::Imagenet => (1.0 / STD[c], -MEAN[c] / STD[c]),
            InputNorm::ImagenetFromPm1 => (0.5 / STD[c], (0.5 - MEAN[c]) / STD[c]),
            InputNorm::FromPm1 => (0.5, 0.5),
            InputNorm::LpipsScaling => (1.0 / LPIPS_SCALE[c], -LPIPS_SHIFT[c] / LPIPS_SCALE[c]),
            InputNorm::LpipsScalingFromUnit => (
                2.0 / LPIPS_SCALE[c],
                (-1.0 - LPIPS_SHIFT[c]) / LPIPS_SCALE[c],
            ),
        }
    }
}

/// Configuration of a [`PerceptualLoss`](crate::PerceptualLoss); `Default`
/// is the article's.
#[derive(Debug, Clone, PartialEq)]
pub struct PerceptualConfig {
    /// Tapped modules, compared at their outputs; default [3, 8, 15, 22].
    pub taps: Vec<Tap>,
    /// One weight per tap; empty means all 1.
    pub tap_weights: Vec<f32>,
    /// MSE (default), MAE, or Fro (the norm of the batch's difference at
    /// each tap, BasicSR's `'fro'`; on CUDA the batch must run in one
    /// chunk).
    pub criterion: Criterion,
    /// Modules whose Gram matrices are compared (the style loss); default
    /// none. `taps` may be empty when this is not: a style loss alone.
    pub style_taps: Vec<Tap>,
    /// One weight per style tap; empty means all 1.
    pub style_tap_weights: Vec<f32>,
    /// The distance between Gram matrices: MSE (default: the mean over the
    /// batch's N*C*C entries), MAE, or Fro (the norm of the whole
    /// N x C x C difference).
    pub style_criterion: Criterion,
    /// The style loss's overall weight (`weight` is the perceptual
    /// part's); default 1.
    pub style_weight: f32,
    /// Input normalisation; default none.
    pub input_norm: InputNorm,
    /// Max (default) or average pooling.
    pub pooling: Pooling,
    /// Overall weight; default 1.
    pub weight: f32,
    /// On CUDA, run at most this many images at a time (pred and target
    /// each), so device memory follows the chunk instead of the batch;
    /// `None` runs the whole batch at once. The loss is the same.
    pub max_chunk_images: Option<usize>,
    /// On CUDA, the device bytes one call may hold for its buffers and the
    /// cuDNN workspace: the batch runs in the largest chunks whose buffers
    /// fit, and convolution algorithms are chosen within the bytes left.
    /// `None`: no limit (the workspace is capped at 256 MiB). A call whose
    /// single image does not fit is an error. No effect on the CPU.
    pub memory_budget: Option<usize>,
    /// Lets f32 convolutions on CUDA use TF32 tensor cores (faster, about
    /// 1e-3 relative error); default off. No effect on f16/bf16 or the CPU.
    pub allow_tf32: bool,
    /// Make a NaN or infinite pred or target an error naming the first such
    /// element (see [`TvConfig::check_finite`](crate::TvConfig::check_finite)).
    pub check_finite: bool,
    /// On CUDA, replay each call from a CUDA graph of the whole call (every
    /// chunk, kernel and cuDNN call): the first call of a shape plans, the
    /// second is captured, later ones are two launches (the call table's
    /// and the graph's), with the same bits. Default off;
    /// `PERCEPTUAL_LOSS_CUDA_GRAPHS=1` or `0` turns graphs on or off for
    /// every loss, whatever its config says. Not used
    /// for LPIPS maps, chunks of unequal size, or a call made while the
    /// caller's stream is being captured (which captures the plain call
    /// into the caller's graph).
    pub cuda_graphs: bool,
}

impl Default for PerceptualConfig {
    fn default() -> Self {
        PerceptualConfig {
            taps: [3, 8, 15, 22].into_iter().map(Tap::Index).collect(),
            tap_weights: Vec::new(),
            criterion: Criterion::Mse,
            style_taps: Vec::new(),
            style_tap_weights: Vec::new(),
            style_criterion: Criterion::Mse,
            style_weight: 1.0,
            input_norm: InputNorm::None,
            pooling: Pooling::Max,
            weight: 1.0,
            max_chunk_images: None,
            memory_budget: None,
            allow_tf32: false,
            check_finite: false,
            cuda_graphs: false,
        }
    }
}

/// A [`PerceptualConfig`] resolved against a loaded network and checked:
/// taps by layer index, ascending, each with its weight.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PerceptualSpec {
    /// (layer index, tap weight), ascending by index: the perceptual terms.
    pub taps: Vec<(usize, f64)>,
    pub criterion: Criterion,
    /// The style (Gram) terms, the same way.
    pub style: Vec<(usize, f64)>,
    pub style_criterion: Criterion,
    pub style_weight: f64,
    /// LPIPS: every perceptual tap is an LPIPS term with these channel
    /// weights (`criterion` is then not used).
    pub lpips: Option<std::sync::Arc<crate::ops::lpips::LinWeights>>,
    pub norm: InputNorm,
    pub pooling: Pooling,
    pub weight: f64,
    pub tf32: bool,
    pub chunk: Option<usize>,
    pub budget: Option<usize>,
    pub check_finite: bool,
    pub graphs: bool,
}

impl PerceptualSpec {
    /// Resolves and checks `config` against `vgg`: every tap exists and is
    /// loaded, taps are distinct, one weight per tap, finite weights.
    pub(crate) fn resolve(config: &PerceptualConfig, vgg: &Vgg) -> Result<Self> {
        check_weight("weight", config.weight)?;
        check_weight("style_weight", config.style_weight)?;
        if config.max_chunk_images == Some(0) {
            return Err(Error::arg("max_chunk_images must be at least 1"));
        }
        if config.taps.is_empty() && config.style_taps.is_empty() {
            return Err(Error::arg(
                "a perceptual loss needs at least one tap or style tap",
            ));
        }
        Ok(PerceptualSpec {
            taps: resolve_taps(vgg, "tap", &config.taps, &config.tap_weights)?,
            criterion: config.criterion,
            style: resolve_taps(
                vgg,
                "style tap",
                &config.style_taps,
                &config.style_tap_weights,
            )?,
            style_criterion: config.style_criterion,
            style_weight: config.style_weight as f64,
            lpips: None,
            norm: config.input_norm,
            pooling: config.pooling,
            weight: config.weight as f64,
            tf32: config.allow_tf32,
            chunk: config.max_chunk_images,
            budget: config.memory_budget,
            check_finite: config.check_finite,
            graphs: config.cuda_graphs,
        })
    }

    /// The deepest tapped layer, perceptual or style: the network runs up
    /// to it.
    pub(crate) fn deepest(&self) -> usize {
        let last = |taps: &[(usize, f64)]| taps.last().map_or(0, |t| t.0);
        last(&self.taps).max(last(&self.style))
    }

    /// The weight of the perceptual tap at `layer`, if it is one.
    pub(crate) fn tap_weight(&self, layer: usize) -> Option<f64> {
        self.taps.iter().find(|t| t.0 == layer).map(|t| t.1)
    }

    /// The weight of the style tap at `layer`, if it is one.
    pub(crate) fn style_weight_at(&self, layer: usize) -> Option<f64> {
        self.style.iter().find(|t| t.0 == layer).map(|t| t.1)
    }

    /// Every tapped layer, perceptual or style, ascending, each once.
    pub(crate) fn tapped(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self.taps.iter().chain(&self.style).map(|t| t.0).collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    }

    /// Whether any term needs the whole batch before its gradient (Fro).
    pub(crate) fn has_norm_terms(&self) -> bool {
        (self.criterion == Criterion::Fro && !self.taps.is_empty())
            || (self.style_criterion == Criterion::Fro && !self.style.is_empty())
    }

    /// How many poolings the deepest tap follows among `layers`.
    pub(crate) fn pools(&self, layers: &[crate::vgg::Layer]) -> u32 {
        layers[..=self.deepest()]
            .iter()
            .filter(|l| l.module == Module::Pool)
            .count() as u32
    }
}

/// Resolves `taps` (the `what`s of a config, with their `weights`, empty
/// for all 1) against `vgg`: each exists, is loaded and is listed once;
/// returned ascending by layer index.
fn resolve_taps(vgg: &Vgg, what: &str, taps: &[Tap], weights: &[f32]) -> Result<Vec<(usize, f64)>> {
    if !weights.is_empty() && weights.len() != taps.len() {
        return Err(Error::arg(format!(
            "{} {what}s but {} {what} weights",
            taps.len(),
            weights.len()
        )));
    }
    let arch = vgg.arch();
    let name = |layer: usize| arch.layer_name(layer).unwrap_or_default();
    let mut resolved = Vec::with_capacity(taps.len());
    for (k, tap) in taps.iter().enumerate() {
        let layer = match tap {
            Tap::Index(i) => arch.resolve(&i.to_string())?,
            Tap::Name(n) => arch.resolve(n)?,
        };
        if layer > vgg.depth() {
            return Err(Error::arg(format!(
                "{what} {} ({layer}) is deeper than the loaded weights (up to module {}, {})",
                name(layer),
                vgg.depth(),
                name(vgg.depth())
            )));
        }
        let w = weights.get(k).copied().unwrap_or(1.0);
        check_weight(
            &format!("the weight of {what} {} ({layer})", name(layer)),
            w,
        )?;
        if resolved.iter().any(|&(i, _)| i == layer) {
            return Err(Error::arg(format!("{what} {layer} is listed twice")));
        }
        resolved.push((layer, w as f64));
    }
    resolved.sort_by_key(|t| t.0);
    Ok(resolved)
}
