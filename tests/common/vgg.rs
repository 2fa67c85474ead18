//! An f64 VGG oracle written from the definitions (direct 3x3 convolution
//! loops, no im2col, no GEMM), and seeded weight files for the tests.

use super::Rng;
use perceptual_loss::{Element, LossOutputs, PerceptualLoss, Shape, TensorMut, TensorRef, VggArch};
use safetensors::{tensor::TensorView, Dtype};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// VGG `features` channel lists (0 = 2x2 max-pool), from torchvision.
pub fn cfg(arch: VggArch) -> Vec<usize> {
    let v16 = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let v19 = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 256, 0, 512, 512, 512, 512, 0, 512, 512, 512, 512, 0,
    ];
    match arch {
        VggArch::Vgg16 => v16.to_vec(),
        VggArch::Vgg19 => v19.to_vec(),
    }
}

pub enum Op {
    Conv {
        in_c: usize,
        out_c: usize,
        w: Vec<f64>,
        b: Vec<f64>,
    },
    Relu,
    Pool,
}

/// A seeded network: modules in torchvision order, He-scaled weights.
pub struct Net {
    ops: Vec<Op>,
    /// The last few inputs of [`Net::features`] and what it gave: finite
    /// differences change one image of a batch, so the others' (and the
    /// targets') features are looked up instead of computed again.
    memo: Mutex<VecDeque<(FeaturesCall, Arc<Outputs>)>>,
}

/// Each module's output, in order.
type Outputs = Vec<Vec<f64>>;

/// The arguments of one [`Net::features`] call.
#[derive(PartialEq)]
struct FeaturesCall {
    x: Vec<f64>,
    dims: (usize, usize),
    last: usize,
    avg_pool: bool,
}

/// Calls [`Net`] remembers.
const MEMO_CALLS: usize = 8;

impl Net {
    pub fn random(arch: VggArch, seed: u64) -> Net {
        let mut rng = Rng::new(seed);
        let mut ops = Vec::new();
        let mut in_c = 3;
        for c in cfg(arch) {
            if c == 0 {
                ops.push(Op::Pool);
                continue;
            }
            let scale = (6.0 / (in_c * 9) as f32).sqrt();
            let w = rng
                .vec(c * in_c * 9, -scale, scale)
                .into_iter()
                .map(|v| v as f64)
                .collect();
            let b = rng
                .vec(c, -0.1, 0.1)
                .into_iter()
                .map(|v| v as f64)
                .collect();
            ops.push(Op::Conv {
                in_c,
                out_c: c,
                w,
                b,
            });
            ops.push(Op::Relu);
            in_c = c;
        }
        Net {
            ops,
            memo: Mutex::default(),
        }
    }

    /// The modules, to edit (what [`Net::features`] remembers is dropped).
    #[allow(dead_code)]
    pub fn ops_mut(&mut self) -> &mut [Op] {
        self.memo.get_mut().unwrap().clear();
        &mut self.ops
    }

    /// Channels of module `layer`'s output.
    #[allow(dead_code)]
    pub fn channels(&self, layer: usize) -> usize {
        (self.ops[..=layer].iter().rev())
            .find_map(|op| match op {
                Op::Conv { out_c, .. } => Some(*out_c),
                _ => None,
            })
            .unwrap_or(3)
    }

    /// safetensors bytes with torchvision names, stored as `dtype`
    /// (F32, F16 or BF16), optionally with a name prefix. Tensors whose
    /// name `skip` returns true for are left out. The values are rounded to
    /// `dtype` in place, so the oracle uses exactly what the file holds.
    pub fn export_safetensors(
        &mut self,
        dtype: Dtype,
        prefix: &str,
        skip: impl Fn(&str) -> bool,
    ) -> Vec<u8> {
        self.memo.get_mut().unwrap().clear();
        let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (index, op) in self.ops.iter_mut().enumerate() {
            if let Op::Conv { in_c, out_c, w, b } = op {
                for (suffix, shape, values) in [
                    ("weight", vec![*out_c, *in_c, 3, 3], w),
                    ("bias", vec![*out_c], b),
                ] {
                    let name = format!("{prefix}features.{index}.{suffix}");
                    let mut bytes = Vec::new();
                    for v in values.iter_mut() {
                        match dtype {
                            Dtype::F32 => {
                                *v = *v as f32 as f64;
                                bytes.extend((*v as f32).to_le_bytes());
                            }
                            Dtype::F16 => {
                                let h = perceptual_loss::half::f16::from_f64(*v);
                                *v = h.to_f64();
                                bytes.extend(h.to_le_bytes());
                            }
                            Dtype::BF16 => {
                                let h = perceptual_loss::half::bf16::from_f64(*v);
                                *v = h.to_f64();
                                bytes.extend(h.to_le_bytes());
                            }
                            _ => panic!("test weights are F32, F16 or BF16"),
                        }
                    }
                    if !skip(&name) {
                        blobs.push((name, shape, bytes));
                    }
                }
            }
        }
        let views: Vec<(String, TensorView<'_>)> = blobs
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    /// Module outputs of one C x H x W image for modules 0..=last.
    pub fn features(&self, x: &[f64], h: usize, w: usize, last: usize, avg_pool: bool) -> Outputs {
        let call = FeaturesCall {
            x: x.to_vec(),
            dims: (h, w),
            last,
            avg_pool,
        };
        let memo = self.memo.lock().unwrap();
        if let Some((_, outs)) = memo.iter().find(|(c, _)| *c == call) {
            return outs.to_vec();
        }
        drop(memo);
        let outs = Arc::new(self.compute(x, h, w, last, avg_pool));
        let mut memo = self.memo.lock().unwrap();
        if memo.len() == MEMO_CALLS {
            memo.pop_front();
        }
        memo.push_back((call, outs.clone()));
        outs.to_vec()
    }

    fn compute(&self, x: &[f64], h: usize, w: usize, last: usize, avg_pool: bool) -> Outputs {
        let (mut c, mut h, mut w) = (3, h, w);
        let mut cur = x.to_vec();
        let mut outs = Vec::new();
        for op in &self.ops[..=last] {
            cur = match op {
                Op::Conv {
                    in_c,
                    out_c,
                    w: k,
                    b,
                } => {
                    // y[o][i][j] = b[o] + sum over (ci, dy, dx) of k * x[ci][i+dy-1][j+dx-1],
                    // the taps outside the image left out. The sums run in that
                    // order for every pixel; the loops go over whole rows of
                    // valid (i, j) so that the inner loop has no bounds tests.
                    let (hw, mut y) = (h * w, vec![0.0; out_c * h * w]);
                    for (o, yo) in y.chunks_exact_mut(hw).enumerate() {
                        yo.fill(b[o]);
                        for (ci, xc) in cur.chunks_exact(hw).enumerate() {
                            for (dy, dx) in (0..3).flat_map(|dy| (0..3).map(move |dx| (dy, dx))) {
                                let kv = k[((o * in_c + ci) * 3 + dy) * 3 + dx];
                                let rows =
                                    1usize.saturating_sub(dy)..(h + 1).saturating_sub(dy).min(h);
                                let cols =
                                    1usize.saturating_sub(dx)..(w + 1).saturating_sub(dx).min(w);
                                for i in rows {
                                    let from = (i + dy - 1) * w + cols.start + dx - 1;
                                    let dst = &mut yo[i * w + cols.start..i * w + cols.end];
                                    let src = &xc[from..from + cols.len()];
                                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += kv * s);
                                }
                            }
                        }
                    }
                    c = *out_c;
                    y
                }
                Op::Relu => cur.iter().map(|&v| v.max(0.0)).collect(),
                Op::Pool => {
                    let (oh, ow) = (h / 2, w / 2);
                    let mut y = Vec::with_capacity(c * oh * ow);
                    for ch in 0..c {
                        for i in 0..oh {
                            for j in 0..ow {
                                let win: Vec<f64> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                                    .iter()
                                    .map(|(a, b)| cur[(ch * h + 2 * i + a) * w + 2 * j + b])
                                    .collect();
                                y.push(if avg_pool {
                                    win.iter().sum::<f64>() / 4.0
                                } else {
                                    win.iter().cloned().fold(f64::MIN, f64::max)
                                });
                            }
                        }
                    }
                    h = oh;
                    w = ow;
                    y
                }
            };
            outs.push(cur.clone());
        }
        outs
    }
}

/// Everything the oracle needs to know about a perceptual configuration.
pub struct Spec {
    pub taps: Vec<(usize, f64)>,
    pub mae: bool,
    /// (scale, shift) per channel: normalised = x * scale + shift.
    pub affine: [(f64, f64); 3],
    pub avg_pool: bool,
    pub weight: f64,
}

pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The perceptual loss of an N x C x H x W batch (C = 1 replicated).
pub fn perceptual(net: &Net, spec: &Spec, pred: &[f64], target: &[f64], s: Shape) -> f64 {
    let (n, c, h, w) = (s.n, s.c, s.h, s.w);
    let last = spec.taps.iter().map(|t| t.0).max().unwrap();
    let image = c * h * w;
    let prep = |x: &[f64]| -> Vec<f64> {
        (0..3)
            .flat_map(|ch| {
                let src = if c == 1 { 0 } else { ch };
                let (s, t) = spec.affine[ch];
                x[src * h * w..(src + 1) * h * w]
                    .iter()
                    .map(move |v| v * s + t)
            })
            .collect()
    };
    let mut sums = vec![0.0; spec.taps.len()];
    let mut counts = vec![0usize; spec.taps.len()];
    for k in 0..n {
        let fp = net.features(
            &prep(&pred[k * image..(k + 1) * image]),
            h,
            w,
            last,
            spec.avg_pool,
        );
        let ft = net.features(
            &prep(&target[k * image..(k + 1) * image]),
            h,
            w,
            last,
            spec.avg_pool,
        );
        for (j, (tap, _)) in spec.taps.iter().enumerate() {
            for (a, b) in fp[*tap].iter().zip(&ft[*tap]) {
                sums[j] += if spec.mae {
                    (a - b).abs()
                } else {
                    (a - b) * (a - b)
                };
            }
            counts[j] += fp[*tap].len();
        }
    }
    spec.weight
        * spec
            .taps
            .iter()
            .enumerate()
            .map(|(j, t)| t.1 * sums[j] / counts[j] as f64)
            .sum::<f64>()
}

/// A perceptual call's results, read back to the host as f64.
pub struct Out {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub per_sample: Vec<f64>,
}

/// Loss, gradient and per-sample values of `loss` on its device.
pub fn run_perceptual<T: Element>(
    loss: &PerceptualLoss,
    pred: &[f32],
    target: &[f32],
    s: Shape,
    beta: f32,
    old: Option<&[f32]>,
) -> Out {
    let conv = |v: &[f32]| v.iter().map(|&x| T::from_f64(x as f64)).collect::<Vec<T>>();
    let nan = vec![f32::NAN; pred.len()];
    let (p, t, g0) = (conv(pred), conv(target), conv(old.unwrap_or(&nan)));
    let dev = loss.vgg().device();
    match dev.cuda_stream() {
        None => {
            let mut g = g0;
            let (mut value, mut per) = (f32::NAN, vec![f32::NAN; s.n]);
            loss.compute(
                &TensorRef::host(&p, s).unwrap(),
                &TensorRef::host(&t, s).unwrap(),
                LossOutputs::new(TensorMut::scalar(&mut value))
                    .with_grad(TensorMut::host(&mut g, s).unwrap())
                    .accumulate(beta)
                    .with_per_sample(TensorMut::host(&mut per, Shape::flat(s.n)).unwrap()),
            )
            .unwrap();
            Out {
                loss: value as f64,
                grad: g.iter().map(|v| v.to_f64()).collect(),
                per_sample: per.iter().map(|&v| v as f64).collect(),
            }
        }
        Some(st) => {
            let (pd, td) = (st.clone_htod(&p).unwrap(), st.clone_htod(&t).unwrap());
            let mut gd = st.clone_htod(&g0).unwrap();
            let mut ld = st.clone_htod(&[f32::NAN]).unwrap();
            let mut psd = st.clone_htod(&vec![f32::NAN; s.n]).unwrap();
            loss.compute(
                &TensorRef::cuda(&pd, s).unwrap(),
                &TensorRef::cuda(&td, s).unwrap(),
                LossOutputs::new(TensorMut::cuda(&mut ld, Shape::flat(1)).unwrap())
                    .with_grad(TensorMut::cuda(&mut gd, s).unwrap())
                    .accumulate(beta)
                    .with_per_sample(TensorMut::cuda(&mut psd, Shape::flat(s.n)).unwrap()),
            )
            .unwrap();
            Out {
                loss: st.clone_dtoh(&ld).unwrap()[0] as f64,
                grad: st
                    .clone_dtoh(&gd)
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f64())
                    .collect(),
                per_sample: st
                    .clone_dtoh(&psd)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect(),
            }
        }
    }
}
