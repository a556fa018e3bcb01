//! One score per sample, from the losses trainers report: 4 bytes per sample, NaN until the
//! sample's first valid report (so an unseen sample is never below the mean, never pruned).

use crate::source::selection::ScoreRule;

/// What applying one report did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Losses that updated a score.
    pub accepted: u64,
    /// NaN, infinite or negative losses: counted and ignored.
    pub bad_loss: u64,
    /// Ids at or past the dataset size: counted and ignored.
    pub bad_id: u64,
}

impl std::ops::AddAssign for Applied {
    fn add_assign(&mut self, o: Applied) {
        self.accepted += o.accepted;
        self.bad_loss += o.bad_loss;
        self.bad_id += o.bad_id;
    }
}

/// Whether a reported loss is usable: finite and not negative.
pub fn valid_loss(loss: f32) -> bool {
    loss.is_finite() && loss >= 0.0
}

/// The per-sample scores.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    values: Vec<f32>,
    rule: ScoreRule,
    ema_factor: f32,
}

impl Scores {
    /// `n` unseen samples.
    pub fn new(n: u64, rule: ScoreRule, ema_factor: f64) -> Scores {
        Scores {
            values: vec![f32::NAN; n as usize],
            rule,
            ema_factor: ema_factor as f32,
        }
    }

    /// Replaces every score (a reloaded state); `values` must hold one per sample.
    pub fn restore(&mut self, values: Vec<f32>) {
        debug_assert_eq!(values.len(), self.values.len());
        self.values = values;
    }

    /// Folds one report in. Bad ids and bad losses change nothing and are counted.
    pub fn apply(&mut self, ids: &[u64], losses: &[f32]) -> Applied {
        let mut a = Applied::default();
        for (&id, &loss) in ids.iter().zip(losses) {
            let Some(score) = self.values.get_mut(id as usize) else {
                a.bad_id += 1;
                continue;
            };
            if !valid_loss(loss) {
                a.bad_loss += 1;
                continue;
            }
            *score = match self.rule {
                ScoreRule::Ema if score.is_finite() => {
                    self.ema_factor * *score + (1.0 - self.ema_factor) * loss
                }
                _ => loss,
            };
            a.accepted += 1;
        }
        a
    }

    /// The scores (NaN = unseen), e.g. to snapshot at an epoch's start.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Samples with a score.
    pub fn seen(&self) -> u64 {
        self.values.iter().filter(|v| v.is_finite()).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_and_ema_rules_and_bad_input_is_counted() {
        let mut s = Scores::new(4, ScoreRule::Last, 0.9);
        assert!(s.values().iter().all(|v| v.is_nan()));
        let a = s.apply(&[0, 1, 2, 3, 9], &[1.0, f32::NAN, f32::INFINITY, -0.5, 1.0]);
        assert_eq!(
            a,
            Applied {
                accepted: 1,
                bad_loss: 3,
                bad_id: 1
            }
        );
        s.apply(&[0], &[3.0]);
        assert_eq!(s.values()[0], 3.0);
        assert_eq!(s.seen(), 1);

        let mut e = Scores::new(1, ScoreRule::Ema, 0.5);
        e.apply(&[0], &[2.0]);
        assert_eq!(e.values()[0], 2.0, "the first report sets the score");
        e.apply(&[0], &[4.0]);
        assert_eq!(e.values()[0], 3.0);
    }
}
