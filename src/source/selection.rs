//! Per-epoch sample selection from reported losses (`[selection]`): which samples an epoch
//! leaves out, and the weight each kept sample carries.
//!
//! Brief overview: [`SelectionConfig`] is the `[selection]` table. With
//! `mode = "infobatch"` (Qin et al., ICLR 2024), [`infobatch_plan`] turns an epoch's full
//! order (the sampler's, unchanged) and a snapshot of the per-sample scores into an
//! [`EpochPlan`]: of the samples whose score is below the mean of the scored samples, a random
//! fraction `prune-ratio` is left out; the kept ones of them get weight `1 / (1 - r)`;
//! everything else (unscored samples included) stays with weight 1. The plan is a pure
//! function of (seed, epoch, order, snapshot), so every node that holds the same snapshot
//! decides the same epoch, and a restarted daemon that reloads it serves the same batches.
//!
//! [`EpochPlan::batch`] deals the kept samples out exactly as the sampler deals a full epoch
//! (global batch `i` = positions `i·W·B ..`, rank `r` its `r`-th run of `B`), so every rank gets
//! the same number of batches. The kept count is first rounded up to whole global batches by
//! taking back pruned samples (each id stays at most once in the epoch); only an epoch that
//! prunes nothing is padded or cut as `drop-last` says.

use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::sampler::below_rejecting;

/// `[selection] mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionMode {
    /// Serve every sample every epoch (the default; batches are byte for byte those of a
    /// daemon without feedback).
    #[default]
    None,
    /// InfoBatch: prune well-learned samples at random, reweight the rest, anneal at the end.
    Infobatch,
}

/// `[selection] score`: how reported losses become a sample's score.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreRule {
    /// The last reported loss (InfoBatch's rule; the default).
    #[default]
    Last,
    /// Exponential moving average: `score = f·score + (1 − f)·loss` (`ema-factor` = f).
    Ema,
}

/// The `[selection]` table.
///
/// ```toml
/// [selection]
/// mode = "infobatch"     # or "none" (default)
/// prune-ratio = 0.5      # r: share of the below-mean samples left out of an epoch
/// anneal = 0.875         # δ: epochs at or past δ·epochs prune nothing
/// epochs = 0             # run length to anneal against when [sampling] epochs = 0
/// score = "last"         # or "ema"
/// ema-factor = 0.9       # f of score = "ema"
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SelectionConfig {
    /// `none` (default) or `infobatch`.
    pub mode: SelectionMode,
    /// Share of the below-mean samples left out of an epoch, `0 ≤ r < 1` (default 0.5).
    pub prune_ratio: f64,
    /// δ, `0 ≤ δ ≤ 1`: epoch `e` prunes only while `e < δ · epochs` (default 0.875).
    pub anneal: f64,
    /// Run length annealed against when `[sampling] epochs` is 0 (unbounded serving);
    /// ignored otherwise. Default 0 (then `infobatch` needs `[sampling] epochs`).
    pub epochs: u64,
    /// How losses become scores (default `last`).
    pub score: ScoreRule,
    /// `f` of `score = "ema"`, `0 ≤ f < 1` (default 0.9).
    pub ema_factor: f64,
    /// Where scores and epoch snapshots are kept (default: `state/<ring name>` under the
    /// cache directory; `--state-dir` overrides).
    pub state_dir: Option<std::path::PathBuf>,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        SelectionConfig {
            mode: SelectionMode::None,
            prune_ratio: 0.5,
            anneal: 0.875,
            epochs: 0,
            score: ScoreRule::Last,
            ema_factor: 0.9,
            state_dir: None,
        }
    }
}

/// The checked InfoBatch parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InfoBatch {
    /// r.
    pub prune_ratio: f64,
    /// δ.
    pub anneal: f64,
    /// Run length in epochs.
    pub epochs: u64,
}

impl InfoBatch {
    /// Whether `epoch` may prune: `epoch < δ · epochs` (the last `1 − δ` of the run serves
    /// everything with weight 1).
    pub fn prunes(&self, epoch: u64) -> bool {
        (epoch as f64) < self.anneal * self.epochs as f64
    }

    /// Weight of a kept below-mean sample: `1 / (1 − r)`.
    pub fn kept_weight(&self) -> f32 {
        (1.0 / (1.0 - self.prune_ratio)) as f32
    }
}

/// One epoch's selection: the kept ids in serving order and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochPlan {
    /// The epoch.
    pub epoch: u64,
    order: Vec<u64>,
    /// Weight per position of `order`; empty = all 1.
    weights: Vec<f32>,
    pruned: u64,
    batches: u64,
    batch_size: u32,
    world_size: u32,
}

impl EpochPlan {
    /// An epoch that keeps all of `order` with weight 1, padded or cut as `drop_last` says.
    /// `None` when not one global batch can be formed with `drop_last`.
    pub fn full(
        epoch: u64,
        order: Vec<u64>,
        batch_size: u32,
        world_size: u32,
        drop_last: bool,
    ) -> Option<EpochPlan> {
        Self::dealt(
            epoch,
            order,
            Vec::new(),
            0,
            batch_size,
            world_size,
            drop_last,
        )
    }

    fn dealt(
        epoch: u64,
        order: Vec<u64>,
        weights: Vec<f32>,
        pruned: u64,
        batch_size: u32,
        world_size: u32,
        drop_last: bool,
    ) -> Option<EpochPlan> {
        let global = u64::from(batch_size) * u64::from(world_size);
        let m = order.len() as u64;
        let batches = if drop_last {
            m / global
        } else {
            m.div_ceil(global)
        };
        (batches > 0 && global > 0).then_some(EpochPlan {
            epoch,
            order,
            weights,
            pruned,
            batches,
            batch_size,
            world_size,
        })
    }

    /// Batches each rank gets in this epoch.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// Distinct samples served in this epoch over all ranks.
    pub fn kept(&self) -> u64 {
        self.order.len() as u64
    }

    /// Samples left out of this epoch.
    pub fn pruned(&self) -> u64 {
        self.pruned
    }

    /// How many leading rows of batch `index` for `rank` are first occurrences in the epoch
    /// (the rest is padding that wraps to the start of the kept order).
    pub fn valid_rows(&self, rank: u32, index: u64) -> u32 {
        super::sampler::valid_prefix(
            self.order.len() as u64,
            self.batch_size,
            self.world_size,
            rank,
            index,
        )
    }

    /// Writes the ids and weights of batch `index` for `rank` into `ids` and `weights`
    /// (cleared first). Positions past the kept samples wrap to the start (padding, only in
    /// an epoch that prunes nothing). `rank`/`index` must be in range.
    pub fn batch(&self, rank: u32, index: u64, ids: &mut Vec<u64>, weights: &mut Vec<f32>) {
        ids.clear();
        weights.clear();
        let b = u64::from(self.batch_size);
        let first = (index * u64::from(self.world_size) + u64::from(rank)) * b;
        let m = self.order.len() as u64;
        for p in (first..first + b).map(|p| (p % m) as usize) {
            ids.push(self.order[p]);
            weights.push(self.weights.get(p).copied().unwrap_or(1.0));
        }
    }
}

/// The InfoBatch plan of `epoch` from the full `order` and a score `snapshot` (one score per
/// id; NaN = never reported, never pruned). Pure: the same arguments give the same plan.
#[allow(clippy::too_many_arguments)]
pub fn infobatch_plan(
    order: Vec<u64>,
    snapshot: &[f32],
    params: &InfoBatch,
    seed: u64,
    epoch: u64,
    batch_size: u32,
    world_size: u32,
    drop_last: bool,
) -> Option<EpochPlan> {
    if !params.prunes(epoch) || params.prune_ratio <= 0.0 {
        return EpochPlan::full(epoch, order, batch_size, world_size, drop_last);
    }
    let score = |id: u64| snapshot.get(id as usize).copied().unwrap_or(f32::NAN);
    let (sum, count) = snapshot
        .iter()
        .filter(|s| s.is_finite())
        .fold((0.0f64, 0u64), |(s, c), &v| (s + f64::from(v), c + 1));
    if count == 0 {
        return EpochPlan::full(epoch, order, batch_size, world_size, drop_last);
    }
    let mean = sum / count as f64;
    // Below-mean ids in id order, then shuffled by a stream of their own: the pruned set
    // depends on the snapshot, never on the order the sampler chose.
    let mut below: Vec<u64> = (0..snapshot.len() as u64)
        .filter(|&id| {
            let s = score(id);
            s.is_finite() && f64::from(s) < mean
        })
        .collect();
    let mut rng = selection_rng(seed, epoch);
    for i in (1..below.len()).rev() {
        let j = below_rejecting(&mut rng, i as u64 + 1) as usize;
        below.swap(i, j);
    }
    let keep = ((1.0 - params.prune_ratio) * below.len() as f64).floor() as usize;
    let mut pruned_n = below.len() - keep;
    // `below[..pruned_n]` are left out; the rest of `below` are kept below-mean samples.
    let mut status = vec![0u8; snapshot.len()]; // 0 other, 1 kept below-mean, 2 pruned
    for (i, &id) in below.iter().enumerate() {
        status[id as usize] = if i < pruned_n { 2 } else { 1 };
    }
    // Entries of each id in the order: 1 for a permutation; a weighted mixture's order may
    // hold an id several times or not at all.
    let mut entries = vec![0u32; snapshot.len()];
    for &id in &order {
        if let Some(e) = entries.get_mut(id as usize) {
            *e += 1;
        }
    }
    let removed: u64 = below[..pruned_n]
        .iter()
        .map(|&id| u64::from(entries[id as usize]))
        .sum();
    // Round the kept count up to whole global batches by taking back pruned samples, the
    // last pruned first.
    let global = u64::from(batch_size) * u64::from(world_size);
    let kept_n = order.len() as u64 - removed;
    let mut short = (global - kept_n % global) % global;
    while short > 0 && pruned_n > 0 {
        pruned_n -= 1;
        let id = below[pruned_n];
        status[id as usize] = 1;
        short = short.saturating_sub(u64::from(entries[id as usize]));
    }
    let state = |id: u64| status.get(id as usize).copied().unwrap_or(0);
    let kept: Vec<u64> = order.iter().copied().filter(|&id| state(id) != 2).collect();
    let removed = (order.len() - kept.len()) as u64;
    if removed == 0 {
        return EpochPlan::full(epoch, order, batch_size, world_size, drop_last);
    }
    let w = params.kept_weight();
    let weights = kept
        .iter()
        .map(|&id| if state(id) == 1 { w } else { 1.0 })
        .collect();
    // A permutation is now a whole number of global batches; a mixture's repeats may leave a
    // tail, padded or dropped as `drop_last` says.
    EpochPlan::dealt(
        epoch, kept, weights, removed, batch_size, world_size, drop_last,
    )
}

/// ChaCha8 keyed by (seed, epoch) and a tag of its own, independent of the sampler's and the
/// augmentations' streams.
fn selection_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..].copy_from_slice(b"ringfeed-select!");
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IB: InfoBatch = InfoBatch {
        prune_ratio: 0.5,
        anneal: 0.875,
        epochs: 8,
    };

    fn even_odd(n: u64) -> Vec<f32> {
        (0..n)
            .map(|id| if id % 2 == 0 { 0.1 } else { 1.0 })
            .collect()
    }

    fn all(plan: &EpochPlan, world: u32) -> (Vec<u64>, Vec<f32>) {
        let (mut ids, mut ws) = (Vec::new(), Vec::new());
        let (mut i, mut w) = (Vec::new(), Vec::new());
        for index in 0..plan.batches() {
            for r in 0..world {
                plan.batch(r, index, &mut i, &mut w);
                ids.extend_from_slice(&i);
                ws.extend_from_slice(&w);
            }
        }
        (ids, ws)
    }

    #[test]
    fn below_mean_half_is_pruned_and_the_rest_reweighted() {
        let order: Vec<u64> = (0..64).rev().collect();
        let plan = infobatch_plan(order, &even_odd(64), &IB, 7, 1, 8, 1, false).unwrap();
        assert_eq!((plan.kept(), plan.pruned(), plan.batches()), (48, 16, 6));
        let (ids, ws) = all(&plan, 1);
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 48, "each id at most once");
        for (id, w) in ids.iter().zip(&ws) {
            assert_eq!(*w, if id % 2 == 0 { 2.0 } else { 1.0 }, "id {id}");
        }
        assert!(ids.iter().filter(|&&id| id % 2 == 1).count() == 32);
    }

    #[test]
    fn unseen_samples_are_never_pruned_and_nothing_is_pruned_without_scores() {
        let mut snap = even_odd(64);
        for s in &mut snap[..32] {
            *s = f32::NAN;
        }
        let plan = infobatch_plan((0..64).collect(), &snap, &IB, 7, 1, 8, 1, false).unwrap();
        let (ids, _) = all(&plan, 1);
        assert!((0..32).all(|id| ids.contains(&id)));
        assert_eq!(plan.pruned(), 8);
        let none = vec![f32::NAN; 64];
        let plan = infobatch_plan((0..64).collect(), &none, &IB, 7, 1, 8, 1, false).unwrap();
        assert_eq!((plan.kept(), plan.pruned()), (64, 0));
    }

    #[test]
    fn annealed_epochs_serve_everything_with_weight_one() {
        for epoch in [7, 8, 100] {
            let plan = infobatch_plan((0..64).collect(), &even_odd(64), &IB, 7, epoch, 8, 1, false)
                .unwrap();
            let (ids, ws) = all(&plan, 1);
            assert_eq!(ids.len(), 64);
            assert!(ws.iter().all(|&w| w == 1.0));
        }
        assert!(IB.prunes(6) && !IB.prunes(7));
    }

    #[test]
    fn ranks_get_equal_batches_and_the_plan_is_a_function_of_its_inputs() {
        // 100 samples, 3 ranks × 4: kept count rounded up to a multiple of 12.
        let snap: Vec<f32> = (0..100).map(|id| (id % 7) as f32).collect();
        let order: Vec<u64> = (0..100).collect();
        let a = infobatch_plan(order.clone(), &snap, &IB, 3, 2, 4, 3, true).unwrap();
        let b = infobatch_plan(order.clone(), &snap, &IB, 3, 2, 4, 3, true).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.kept() % 12, 0);
        let (ids, _) = all(&a, 3);
        assert_eq!(ids.len() as u64, a.kept());
        let mut d = ids.clone();
        d.sort_unstable();
        d.dedup();
        assert_eq!(d.len(), ids.len());
        let other_epoch = infobatch_plan(order.clone(), &snap, &IB, 3, 3, 4, 3, true).unwrap();
        assert_ne!(all(&a, 3).0, all(&other_epoch, 3).0);
        let mut moved = snap.clone();
        moved[0] = 6.0;
        let c = infobatch_plan(order, &moved, &IB, 3, 2, 4, 3, true).unwrap();
        assert_ne!(all(&a, 3).0, all(&c, 3).0);
    }

    #[test]
    fn an_order_with_repeats_loses_every_entry_of_a_pruned_sample() {
        // A weighted mixture's epoch may hold a sample twice (ids 0..8 twice) or not at all
        // (ids 56..64).
        let order: Vec<u64> = (0..8).chain(0..56).collect();
        let plan = infobatch_plan(order.clone(), &even_odd(64), &IB, 7, 1, 4, 1, true).unwrap();
        let (ids, ws) = all(&plan, 1);
        let gone: Vec<u64> = (0..64)
            .filter(|id| order.contains(id) && !ids.contains(id))
            .collect();
        assert!(!gone.is_empty());
        assert!(
            gone.iter().all(|id| id % 2 == 0),
            "only below-mean samples are pruned"
        );
        let entries = |id: u64| order.iter().filter(|&&o| o == id).count() as u64;
        assert_eq!(
            plan.pruned(),
            gone.iter().map(|&id| entries(id)).sum::<u64>()
        );
        assert_eq!(ids.len() as u64 % 4, 0);
        for (id, w) in ids.iter().zip(&ws) {
            assert_eq!(*w, if id % 2 == 0 { 2.0 } else { 1.0 });
        }
    }
}
