//! Closing the loop: what the daemon learns from the losses trainers report, and how it
//! decides what each epoch serves.
//!
//! # Brief overview
//!
//! Trainers send feedback frames on their attach connection ([`crate::ring::feedback`]); the
//! pipeline hands each one to the [`Selector`], which
//!
//! 1. folds valid losses into one score per sample (`scores.rs`; NaN/inf/negative losses and
//!    unknown ids are counted and ignored);
//! 2. adds them to the per-epoch loss statistics by augmentation bucket and class
//!    (`evaluation.rs`, fed by the [`ParamLog`] the workers write);
//! 3. with `[selection] mode = "infobatch"`, decides each epoch's plan at its start from a
//!    snapshot of the scores ([`crate::source::selection::infobatch_plan`]), once every lane has
//!    said it finished the previous epoch (so the snapshot holds every report of it, on every
//!    node alike), and persists the snapshot (`state.rs`) so a restart decides the same.
//!
//! # What is promised (and tested)
//!
//! - Epoch `e`'s plan is a function of (seed, epoch, the scores after all reports of epochs
//!   before `e`). The end-to-end tests in `clients/python/tests/test_selection.py` run the real
//!   daemon: the even/odd example (every odd id, half the even ids with weight 2, annealed last
//!   epoch), a restart of daemon and trainer mid-run serving the same epochs, two daemons as
//!   two nodes deciding byte-identical snapshots (also through real `torch.distributed`), bad
//!   and late reports, and `ringfeed stat`'s loss by bucket and class.
//! - With `mode = "none"` batches are byte for byte those of a daemon without this module.
#![forbid(unsafe_code)]

mod evaluation;
mod scores;
mod state;

pub use evaluation::{buckets, Evaluation, ParamLog};
pub use scores::{valid_loss, Applied, Scores};
pub use state::{StateStore, KEPT_SNAPSHOTS};

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::source::selection::{infobatch_plan, EpochPlan, InfoBatch};

/// How often changed scores are saved between epoch boundaries.
const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Whether this daemon continues an earlier daemon's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Not known yet: no resume seen, no epoch past 0 decided.
    Undecided,
    /// A consumer resumed mid-run: the saved scores and snapshots are this run's.
    Resumed,
    /// A new run: saved state was cleared.
    Fresh,
}

/// Everything the daemon keeps about reported losses, and the per-epoch decision.
#[derive(Debug)]
pub struct Selector {
    infobatch: Option<InfoBatch>,
    scores: Scores,
    evaluation: Evaluation,
    params: Arc<ParamLog>,
    store: Option<StateStore>,
    run: Run,
    /// Per lane: the first epoch it has not finished (all its reports before it are in).
    lane_ready: Vec<u64>,
    dirty: bool,
    last_save: Instant,
}

impl Selector {
    /// A selector for `n` samples and `lanes` lanes. `infobatch`: `None` for `mode = "none"`
    /// (reports still feed scores and statistics; nothing is pruned or persisted).
    pub fn new(
        n: u64,
        lanes: u32,
        scores: Scores,
        infobatch: Option<InfoBatch>,
        store: Option<StateStore>,
    ) -> Selector {
        Selector {
            infobatch,
            scores,
            evaluation: Evaluation::default(),
            params: Arc::new(ParamLog::new(n)),
            store,
            run: Run::Undecided,
            lane_ready: vec![0; lanes as usize],
            dirty: false,
            last_save: Instant::now(),
        }
    }

    /// Whether epochs are selected (`mode = "infobatch"`).
    pub fn selecting(&self) -> bool {
        self.infobatch.is_some()
    }

    /// The log workers record each served sample's parameters in.
    pub fn param_log(&self) -> Arc<ParamLog> {
        Arc::clone(&self.params)
    }

    /// The scores (NaN = unseen).
    pub fn scores(&self) -> &Scores {
        &self.scores
    }

    /// The loss statistics.
    pub fn evaluation(&self) -> &Evaluation {
        &self.evaluation
    }

    /// Folds in a report of losses of samples served in `epoch`; `label` gives a sample's
    /// class, `stream` its stream in a mixture (`None` for one dataset), so the evaluation
    /// can be split by stream.
    pub fn report(
        &mut self,
        epoch: u64,
        ids: &[u64],
        losses: &[f32],
        label: impl Fn(u64) -> i64,
        stream: impl Fn(u64) -> Option<u16>,
    ) -> Applied {
        let applied = self.scores.apply(ids, losses);
        self.dirty |= applied.accepted > 0;
        self.evaluation.bad_losses += applied.bad_loss;
        self.evaluation.bad_ids += applied.bad_id;
        let n = self.scores.values().len() as u64;
        for (&id, &loss) in ids.iter().zip(losses) {
            if id < n && valid_loss(loss) {
                let b = self.params.lookup(id, epoch);
                self.evaluation.add(epoch, b, label(id), stream(id), loss);
            }
        }
        applied
    }

    /// Lane `lane` finished `epoch`: every report of it was sent before this.
    pub fn epoch_done(&mut self, lane: u32, epoch: u64) {
        if let Some(r) = self.lane_ready.get_mut(lane as usize) {
            *r = (*r).max(epoch + 1);
        }
    }

    /// Lane `lane`'s consumer resumed at `epoch`: it has finished the epochs before. The
    /// first resume past epoch 0 adopts the scores an earlier daemon of this run saved.
    pub fn resumed(&mut self, lane: u32, epoch: u64) {
        if let Some(r) = self.lane_ready.get_mut(lane as usize) {
            *r = (*r).max(epoch);
        }
        if epoch > 0 && self.run == Run::Undecided {
            if let Some(store) = &self.store {
                let n = self.scores.values().len() as u64;
                if let Some(saved) = store.load_scores(n) {
                    log::info!(
                        "resuming a run: {} sample scores reloaded from {}",
                        saved.iter().filter(|v| v.is_finite()).count(),
                        store.dir().display()
                    );
                    self.scores.restore(saved);
                    self.run = Run::Resumed;
                }
            }
        }
    }

    /// Whether epoch `epoch` can be decided now: epoch 0, or every lane finished the one
    /// before (always true without selection).
    pub fn may_decide(&self, epoch: u64) -> bool {
        !self.selecting() || epoch == 0 || self.lane_ready.iter().all(|&r| r >= epoch)
    }

    /// The lanes that have not yet said they finished the epoch before `epoch`.
    pub fn lanes_behind(&self, epoch: u64) -> Vec<u32> {
        (0..self.lane_ready.len() as u32)
            .filter(|&l| self.lane_ready[l as usize] < epoch)
            .collect()
    }

    /// Decides epoch `epoch` from its full `order`: InfoBatch on the scores snapshot (the
    /// saved one when resuming a run), or everything. `None` when `drop_last` leaves no batch.
    pub fn decide(
        &mut self,
        epoch: u64,
        order: Vec<u64>,
        seed: u64,
        batch_size: u32,
        world_size: u32,
        drop_last: bool,
    ) -> Option<EpochPlan> {
        let Some(ib) = self.infobatch else {
            return EpochPlan::full(epoch, order, batch_size, world_size, drop_last);
        };
        let n = self.scores.values().len() as u64;
        if epoch > 0 && self.run == Run::Undecided {
            self.run = Run::Fresh;
            if let Some(store) = &self.store {
                if let Err(e) = store.reset() {
                    log::warn!("cannot reset {}: {e}", store.dir().display());
                }
            }
        }
        // This run's snapshot of the epoch, if it was decided before: a trainer resumed at an
        // earlier epoch (daemon restarted or not) gets the epoch it had.
        let saved = match (&self.store, self.run) {
            (Some(store), Run::Resumed | Run::Fresh) => store.load_snapshot(epoch, n),
            _ => None,
        };
        let snapshot = saved.unwrap_or_else(|| self.scores.values().to_vec());
        let plan = infobatch_plan(
            order, &snapshot, &ib, seed, epoch, batch_size, world_size, drop_last,
        );
        if let Some(store) = &self.store {
            if epoch > 0 {
                if let Err(e) = store.save_snapshot(epoch, &snapshot) {
                    log::warn!("cannot save the epoch {epoch} snapshot: {e}");
                }
            }
        }
        self.save(true);
        plan
    }

    /// Saves the live scores if they changed and `now` or the save interval has passed.
    pub fn save(&mut self, now: bool) {
        if !self.dirty || !(now || self.last_save.elapsed() >= SAVE_EVERY) {
            return;
        }
        let Some(store) = &self.store else {
            return;
        };
        if self.run == Run::Undecided {
            // Nothing past epoch 0 decided and no resume: scores belong to a new run whose
            // state is reset only when epoch 1 is decided; do not overwrite an earlier run's
            // saved scores before a possible resume adopts them.
            return;
        }
        match store.save_scores(self.scores.values()) {
            Ok(()) => {
                self.dirty = false;
                self.last_save = Instant::now();
            }
            Err(e) => log::warn!("cannot save scores in {}: {e}", store.dir().display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::selection::ScoreRule;

    const IB: InfoBatch = InfoBatch {
        prune_ratio: 0.5,
        anneal: 0.875,
        epochs: 8,
    };

    fn selector(store: Option<StateStore>) -> Selector {
        Selector::new(
            16,
            2,
            Scores::new(16, ScoreRule::Last, 0.9),
            Some(IB),
            store,
        )
    }

    fn even_odd(s: &mut Selector, epoch: u64) {
        let ids: Vec<u64> = (0..16).collect();
        let losses: Vec<f32> = ids
            .iter()
            .map(|id| if id % 2 == 0 { 0.1 } else { 1.0 })
            .collect();
        s.report(epoch, &ids, &losses, |id| (id % 3) as i64, |_| None);
    }

    #[test]
    fn an_epoch_waits_for_every_lane_and_a_resume_counts_as_done() {
        let mut s = selector(None);
        assert!(s.may_decide(0));
        assert!(!s.may_decide(1));
        s.epoch_done(0, 0);
        assert!(!s.may_decide(1), "lane 1 has not finished epoch 0");
        assert_eq!(s.lanes_behind(1), vec![1]);
        s.resumed(1, 1);
        assert!(s.may_decide(1));
        assert!(s.lanes_behind(1).is_empty());
        assert!(!s.may_decide(2));
        let none = Selector::new(16, 2, Scores::new(16, ScoreRule::Last, 0.9), None, None);
        assert!(none.may_decide(5), "without selection nothing waits");
    }

    #[test]
    fn a_decided_epoch_is_decided_again_from_its_saved_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "run".into()).unwrap();
        let mut s = selector(Some(store.clone()));
        even_odd(&mut s, 0);
        let order: Vec<u64> = (0..16).collect();
        let first = s.decide(1, order.clone(), 7, 2, 1, false).unwrap();
        assert_eq!((first.kept(), first.pruned()), (12, 4));
        // Later losses change the scores; epoch 1 asked for again is the same epoch.
        s.report(1, &[0, 2, 4, 6], &[9.0; 4], |_| 0, |_| None);
        assert_eq!(s.decide(1, order.clone(), 7, 2, 1, false).unwrap(), first);

        // A new daemon of the same run, resumed at epoch 1, reloads scores and snapshot.
        s.save(true);
        let mut again = selector(Some(store));
        again.resumed(0, 1);
        assert_eq!(again.scores().values(), s.scores().values());
        assert_eq!(again.decide(1, order, 7, 2, 1, false).unwrap(), first);
    }

    #[test]
    fn a_new_run_clears_the_saved_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path(), "run".into()).unwrap();
        store.reset().unwrap();
        store.save_scores(&[1.0; 16]).unwrap();
        store.save_snapshot(1, &[1.0; 16]).unwrap();
        let mut s = selector(Some(store.clone()));
        s.epoch_done(0, 0);
        s.epoch_done(1, 0);
        let plan = s.decide(1, (0..16).collect(), 7, 2, 1, false).unwrap();
        assert_eq!(
            plan.pruned(),
            0,
            "nothing reported in this run: nothing pruned"
        );
        assert!(
            store
                .load_scores(16)
                .is_none_or(|v| v.iter().all(|x| x.is_nan())),
            "the old run's scores are gone"
        );
    }
}
