//! VGG16/VGG19 `features` as torchvision indexes them: every conv, ReLU and
//! max-pool is one module, and each has a name (`conv3_3`, `relu3_3`,
//! `pool3`). Convolutions are 3x3 with padding 1; pools 2x2 stride 2, floor.

use crate::error::{Error, Result};

/// Which network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VggArch {
    /// VGG16: 13 convolutions, 31 modules.
    Vgg16,
    /// VGG19: 16 convolutions, 37 modules.
    Vgg19,
}

/// Channel counts per conv, 0 for a max-pool (torchvision's `cfgs`).
const VGG16: &[usize] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
];
const VGG19: &[usize] = &[
    64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0,
];

/// One module of `features`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Module {
    /// 3x3 convolution, padding 1.
    Conv {
        in_c: usize,
        out_c: usize,
    },
    Relu,
    Pool,
}

/// A module with its torchvision index and name. Layers are always named
/// by that index (`layer` in the code), which is also their position in
/// [`VggArch::layers`] and the key of their weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layer {
    pub index: usize,
    pub name: String,
    pub module: Module,
}

/// (channels, height, width) of one image's activation.
pub(crate) type Dims = (usize, usize, usize);

/// The output dims of every layer in `layers` for one input image of
/// `input` dims: convolutions set the channels, pools halve H and W (floor).
pub(crate) fn output_dims(layers: &[Layer], input: Dims) -> Vec<Dims> {
    let (mut c, mut h, mut w) = input;
    layers
        .iter()
        .map(|l| {
            match l.module {
                Module::Conv { out_c, .. } => c = out_c,
                Module::Relu => {}
                Module::Pool => {
                    h /= 2;
                    w /= 2;
                }
            }
            (c, h, w)
        })
        .collect()
}

impl VggArch {
    /// Lower-case name, also the accepted weight-name prefix.
    pub fn name(self) -> &'static str {
        match self {
            VggArch::Vgg16 => "vgg16",
            VggArch::Vgg19 => "vgg19",
        }
    }

    /// Every module of `features`, in order.
    pub(crate) fn layers(self) -> Vec<Layer> {
        let cfg = match self {
            VggArch::Vgg16 => VGG16,
            VggArch::Vgg19 => VGG19,
        };
        let (mut layers, mut block, mut k, mut in_c) = (Vec::new(), 1, 1, 3);
        for &out_c in cfg {
            let index = layers.len();
            if out_c == 0 {
                layers.push(Layer {
                    index,
                    name: format!("pool{block}"),
                    module: Module::Pool,
                });
                block += 1;
                k = 1;
                continue;
            }
            layers.push(Layer {
                index,
                name: format!("conv{block}_{k}"),
                module: Module::Conv { in_c, out_c },
            });
            layers.push(Layer {
                index: index + 1,
                name: format!("relu{block}_{k}"),
                module: Module::Relu,
            });
            in_c = out_c;
            k += 1;
        }
        layers
    }

    /// The index of a module given by index or name (`"relu3_3"`, `"22"`).
    pub fn resolve(self, tap: &str) -> Result<usize> {
        let layers = self.layers();
        let found = match tap.trim().parse::<usize>() {
            Ok(i) => layers.get(i).map(|l| l.index),
            Err(_) => layers
                .iter()
                .find(|l| l.name == tap.trim())
                .map(|l| l.index),
        };
        found.ok_or_else(|| {
            Error::arg(format!(
                "{} has no layer {tap:?} (indices 0 to {}, names like conv3_3, relu3_3, pool3)",
                self.name(),
                layers.len() - 1
            ))
        })
    }

    /// The name of module `index` (e.g. 22 -> "relu4_3" in VGG16).
    pub fn layer_name(self, index: usize) -> Option<String> {
        self.layers().get(index).map(|l| l.name.clone())
    }

    /// Number of modules in `features`.
    pub fn module_count(self) -> usize {
        self.layers().len()
    }
}
