//! Places a schedule's buffers in one device allocation. A buffer lives
//! from the first step that uses it to the last; buffers whose lifetimes
//! overlap get disjoint bytes, the others share. So the forward
//! activations of early layers are reused by later layers, inner tap
//! gradients and the backward pass, and the allocation is close to the
//! largest set of buffers alive at any one step rather than their sum.

use super::schedule::{Schedule, Size};

/// Every buffer start is aligned to this (cuDNN and vector loads like it).
const ALIGN: usize = 256;

/// Byte offsets of a schedule's buffers in one allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub offsets: Vec<usize>,
    /// Size of the allocation.
    pub bytes: usize,
    /// By buffer: the kept target slot it is, which lives outside the
    /// allocation.
    pub kept: Vec<Option<usize>>,
}

/// (first step, last step) that uses each buffer.
fn lifetimes(schedule: &Schedule) -> Vec<(usize, usize)> {
    let mut life = vec![(usize::MAX, 0); schedule.buffers.len()];
    for (i, step) in schedule.steps.iter().enumerate() {
        for b in step.buffers() {
            life[b].0 = life[b].0.min(i);
            life[b].1 = life[b].1.max(i);
        }
    }
    life
}

/// The largest total bytes of buffers alive at one step: no layout can be smaller.
#[cfg(test)]
pub(crate) fn live_peak(schedule: &Schedule, value_bytes: usize) -> usize {
    let life = lifetimes(schedule);
    (0..schedule.steps.len())
        .map(|i| {
            schedule
                .buffers
                .iter()
                .zip(&life)
                .filter(|(_, l)| l.0 <= i && i <= l.1)
                .map(|(s, _)| s.bytes(value_bytes).next_multiple_of(ALIGN))
                .sum::<usize>()
        })
        .max()
        .unwrap_or(0)
}

impl Layout {
    /// Greedy placement: each buffer in turn goes to the lowest offset
    /// free of every placed buffer whose lifetime overlaps its own. The
    /// result depends on the order, so a few orders are tried — largest
    /// first, longest-lived first, and seeded shuffles of the largest-first
    /// order (fixed seed: the same schedule always gets the same layout) —
    /// and the smallest layout is kept.
    pub(crate) fn new(schedule: &Schedule, value_bytes: usize) -> Layout {
        let life = lifetimes(schedule);
        let sizes: Vec<usize> = schedule
            .buffers
            .iter()
            .map(|s| match s {
                Size::Kept(_) => 0,
                s => s.bytes(value_bytes).max(1).next_multiple_of(ALIGN),
            })
            .collect();
        let span = |b: usize| life[b].1.saturating_sub(life[b].0);
        let mut largest: Vec<usize> = (0..sizes.len()).collect();
        largest.sort_by_key(|&b| (std::cmp::Reverse(sizes[b]), life[b].0));
        let mut longest = largest.clone();
        longest.sort_by_key(|&b| std::cmp::Reverse(span(b)));
        let mut best = place(&largest, &sizes, &life).min_by(place(&longest, &sizes, &life));
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut order = largest;
        for _ in 0..SHUFFLES {
            for i in (1..order.len()).rev() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                order.swap(i, (rng % (i as u64 + 1)) as usize);
            }
            best = best.min_by(place(&order, &sizes, &life));
        }
        best.kept = (schedule.buffers.iter())
            .map(|s| match s {
                Size::Kept(slot) => Some(*slot),
                _ => None,
            })
            .collect();
        best
    }

    fn min_by(self, other: Layout) -> Layout {
        if other.bytes < self.bytes {
            other
        } else {
            self
        }
    }
}

/// Shuffled orders tried per layout; a layout is built once per input shape.
const SHUFFLES: usize = 256;

fn place(order: &[usize], sizes: &[usize], life: &[(usize, usize)]) -> Layout {
    let mut offsets = vec![0; sizes.len()];
    let mut placed: Vec<usize> = Vec::new();
    for &b in order {
        let overlaps = |o: usize| life[o].0 <= life[b].1 && life[b].0 <= life[o].1;
        let mut taken: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&o| overlaps(o))
            .map(|&o| (offsets[o], offsets[o] + sizes[o]))
            .collect();
        taken.sort_unstable();
        let mut at = 0;
        for (start, end) in taken {
            if start >= at + sizes[b] {
                break;
            }
            at = at.max(end);
        }
        offsets[b] = at;
        placed.push(b);
    }
    let bytes = placed
        .iter()
        .map(|&b| offsets[b] + sizes[b])
        .max()
        .unwrap_or(0);
    Layout {
        offsets,
        bytes,
        kept: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::perceptual::cuda::schedule::{self, Batch};
    use crate::ops::perceptual::{PerceptualConfig, PerceptualLoss, Tap};
    use crate::vgg::{Pooling, VggArch};

    fn configs() -> Vec<(VggArch, PerceptualConfig)> {
        let taps = |names: &[&str]| names.iter().map(|&n| Tap::from(n)).collect();
        vec![
            (VggArch::Vgg16, PerceptualConfig::default()),
            (
                VggArch::Vgg19,
                PerceptualConfig {
                    taps: taps(&["conv1_2", "relu2_1", "pool3", "conv4_4"]),
                    ..Default::default()
                },
            ),
            (
                VggArch::Vgg16,
                PerceptualConfig {
                    taps: taps(&["pool1", "relu2_2", "pool2"]),
                    pooling: Pooling::Avg,
                    ..Default::default()
                },
            ),
            (
                VggArch::Vgg16,
                PerceptualConfig {
                    style_taps: taps(&["relu1_2", "relu2_2", "relu3_3"]),
                    ..Default::default()
                },
            ),
        ]
    }

    #[test]
    fn buffers_alive_together_never_share_bytes() {
        for (arch, config) in configs() {
            let loss = PerceptualLoss::seeded(arch, &config);
            let batches = [Batch::Pairs, Batch::Pred, Batch::Target];
            for (want_grad, batch) in [true, false]
                .into_iter()
                .flat_map(|g| batches.map(|b| (g, b)))
            {
                let s = schedule::build(
                    loss.vgg().layers(),
                    loss.spec(),
                    batch,
                    (3, 37, 21),
                    want_grad,
                    false,
                )
                .unwrap();
                let layout = Layout::new(&s, 2);
                let life = lifetimes(&s);
                let size = |b: usize| s.buffers[b].bytes(2);
                for a in 0..s.buffers.len() {
                    // A kept slot is outside the allocation.
                    assert_eq!(
                        layout.kept[a].is_some(),
                        matches!(s.buffers[a], Size::Kept(_))
                    );
                    assert_eq!(layout.offsets[a] % ALIGN, 0);
                    assert!(layout.offsets[a] + size(a) <= layout.bytes);
                    for b in a + 1..s.buffers.len() {
                        let alive_together = life[a].0 <= life[b].1 && life[b].0 <= life[a].1;
                        let disjoint = layout.offsets[a] + size(a) <= layout.offsets[b]
                            || layout.offsets[b] + size(b) <= layout.offsets[a];
                        assert!(
                            !alive_together || disjoint,
                            "{config:?}: buffers {a} and {b} overlap while both alive"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_allocation_stays_near_the_live_peak() {
        // The benchmark's shape: 8x3x256x256 in bf16.
        for (arch, config) in configs() {
            let loss = PerceptualLoss::seeded(arch, &config);
            let (layers, spec) = (loss.vgg().layers(), loss.spec());
            let s =
                schedule::build(layers, spec, Batch::Pairs, (8, 256, 256), true, false).unwrap();
            let layout = Layout::new(&s, 2);
            let peak = live_peak(&s, 2);
            let sum: usize = s.buffers.iter().map(|b| b.bytes(2)).sum();
            eprintln!(
                "{arch:?} {:?}: allocation {:.1} MiB, live peak {:.1} MiB, all buffers {:.1} MiB",
                config.taps,
                layout.bytes as f64 / 1048576.0,
                peak as f64 / 1048576.0,
                sum as f64 / 1048576.0
            );
            assert!(
                layout.bytes as f64 <= 1.05 * peak as f64,
                "{config:?}: {} bytes for a live peak of {peak}",
                layout.bytes
            );
        }
    }
}
