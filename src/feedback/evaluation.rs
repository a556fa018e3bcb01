//! Evaluating the generated samples: mean reported loss per bucket of each augmentation
//! parameter and per class, per epoch.
//!
//! Brief overview: when a worker writes a sample, [`ParamLog::record`] stores the epoch and the
//! bucket of each of its random parameters ([`SampleParams`]) in one 8-byte word per sample.
//! When a loss for that sample arrives tagged with the same epoch, [`Evaluation::add`] adds it
//! to that epoch's sums per (parameter, bucket) and per class. A loss for a sample that was
//! served again since (or never here, e.g. another node's rank) is counted as unattributed.
//! [`Evaluation::to_json`] is what `ringfeed stat`, `--json` and the metrics endpoint show.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use crate::augment::SampleParams;

/// A parameter evaluated, with its bucket labels (bucket index = label position).
struct Parameter {
    key: &'static str,
    title: &'static str,
    labels: &'static [&'static str],
    /// Buckets that mean "not applied": a parameter with data only there is not shown.
    neutral: &'static [usize],
}

const FACTOR: &[&str] = &[
    "not applied",
    "<0.8",
    "0.8–0.95",
    "0.95–1.05",
    "1.05–1.25",
    "≥1.25",
];
const FACTOR_EDGES: [f32; 4] = [0.8, 0.95, 1.05, 1.25];

const PARAMETERS: [Parameter; 8] = [
    Parameter {
        key: "crop_area",
        title: "crop area",
        labels: &["0–0.2", "0.2–0.35", "0.35–0.5", "0.5–0.75", "0.75–1"],
        neutral: &[],
    },
    Parameter {
        key: "crop_aspect",
        title: "crop aspect",
        labels: &["<0.8", "0.8–0.95", "0.95–1.05", "1.05–1.25", "≥1.25"],
        neutral: &[],
    },
    Parameter {
        key: "flip",
        title: "flip",
        labels: &["none", "horizontal", "vertical", "both"],
        neutral: &[0],
    },
    Parameter {
        key: "rotation",
        title: "rotation",
        labels: &["none", "0–5°", "5–10°", "10–20°", "≥20°"],
        neutral: &[0],
    },
    Parameter {
        key: "brightness",
        title: "brightness",
        labels: FACTOR,
        neutral: &[0],
    },
    Parameter {
        key: "contrast",
        title: "contrast",
        labels: FACTOR,
        neutral: &[0],
    },
    Parameter {
        key: "saturation",
        title: "saturation",
        labels: FACTOR,
        neutral: &[0],
    },
    Parameter {
        key: "hue",
        title: "hue shift",
        labels: &["not applied", "0–0.02", "0.02–0.05", "0.05–0.1", "≥0.1"],
        neutral: &[0],
    },
];

fn bucket(value: f32, edges: &[f32]) -> u32 {
    edges.iter().take_while(|&&e| value >= e).count() as u32
}

fn factor(v: Option<f32>) -> u32 {
    v.map_or(0, |f| 1 + bucket(f, &FACTOR_EDGES))
}

/// The bucket of each parameter, 4 bits each (parameter `i` in bits `4i..4i+4`).
pub fn buckets(p: &SampleParams) -> u32 {
    let rotation = if p.rotation == 0.0 {
        0
    } else {
        1 + bucket(p.rotation.abs(), &[5.0, 10.0, 20.0])
    };
    let hue = p.hue.map_or(0, |h| 1 + bucket(h.abs(), &[0.02, 0.05, 0.1]));
    let values = [
        bucket(p.crop_area, &[0.2, 0.35, 0.5, 0.75]),
        bucket(p.crop_aspect, &[0.8, 0.95, 1.05, 1.25]),
        u32::from(p.hflip) | (u32::from(p.vflip) << 1),
        rotation,
        factor(p.brightness),
        factor(p.contrast),
        factor(p.saturation),
        hue,
    ];
    values
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &b)| acc | (b.min(15) << (4 * i)))
}

/// The epoch and parameter buckets each sample was last served with: 8 bytes per sample,
/// written by the workers without locks.
#[derive(Debug)]
pub struct ParamLog {
    words: Vec<AtomicU64>,
}

impl ParamLog {
    /// A log for `n` samples, none served yet.
    pub fn new(n: u64) -> ParamLog {
        ParamLog {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Sample `id` was served in `epoch` with `params`.
    pub fn record(&self, id: u64, epoch: u64, params: &SampleParams) {
        if let Some(w) = self.words.get(id as usize) {
            let tag = (epoch as u32).wrapping_add(1);
            w.store(
                (u64::from(tag) << 32) | u64::from(buckets(params)),
                Ordering::Relaxed,
            );
        }
    }

    /// The buckets `id` was served with in `epoch`, if that was its last serving here.
    pub fn lookup(&self, id: u64, epoch: u64) -> Option<u32> {
        let w = self.words.get(id as usize)?.load(Ordering::Relaxed);
        let tag = (epoch as u32).wrapping_add(1);
        ((w >> 32) as u32 == tag).then_some(w as u32)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    count: u64,
}

impl Mean {
    fn add(&mut self, v: f32) {
        self.sum += f64::from(v);
        self.count += 1;
    }
    fn value(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum / self.count as f64
        }
    }
}

#[derive(Debug, Clone, Default)]
struct EpochStats {
    all: Mean,
    by_param: [[Mean; 16]; PARAMETERS.len()],
    by_class: HashMap<i64, Mean>,
    /// Per stream of a mixture (`[[source.streams]]`); empty for one dataset.
    by_stream: BTreeMap<u16, Mean>,
}

/// Epochs whose statistics are kept.
const KEPT_EPOCHS: usize = 3;

/// Loss statistics of the last few epochs, and the report counters.
#[derive(Debug, Default)]
pub struct Evaluation {
    epochs: BTreeMap<u64, EpochStats>,
    /// Valid losses received.
    pub losses: u64,
    /// Valid losses whose sample was not (or no longer) served here in that epoch.
    pub unattributed: u64,
    /// NaN, infinite or negative losses (ignored).
    pub bad_losses: u64,
    /// Ids outside the dataset (ignored).
    pub bad_ids: u64,
}

impl Evaluation {
    /// Adds one valid loss of sample `buckets`-`class` served in `epoch` (`None` buckets:
    /// not attributable here), from mixture stream `stream` (`None`: one dataset).
    pub fn add(
        &mut self,
        epoch: u64,
        buckets: Option<u32>,
        class: i64,
        stream: Option<u16>,
        loss: f32,
    ) {
        self.losses += 1;
        let Some(b) = buckets else {
            self.unattributed += 1;
            return;
        };
        if !self.epochs.contains_key(&epoch) {
            if self.epochs.len() == KEPT_EPOCHS
                && self.epochs.keys().next().is_some_and(|&e| e > epoch)
            {
                return; // older than anything kept: too late to matter
            }
            self.epochs.insert(epoch, EpochStats::default());
            while self.epochs.len() > KEPT_EPOCHS {
                self.epochs.pop_first();
            }
        }
        let Some(s) = self.epochs.get_mut(&epoch) else {
            return;
        };
        s.all.add(loss);
        for (i, row) in s.by_param.iter_mut().enumerate() {
            row[((b >> (4 * i)) & 15) as usize].add(loss);
        }
        s.by_class.entry(class).or_default().add(loss);
        if let Some(stream) = stream {
            s.by_stream.entry(stream).or_default().add(loss);
        }
    }

    /// Epochs with statistics, newest last.
    pub fn epochs(&self) -> Vec<u64> {
        self.epochs.keys().copied().collect()
    }

    /// The statistics as JSON: counters, then per epoch the mean loss per bucket of each
    /// parameter that varied and per class.
    pub fn to_json(&self) -> Value {
        let epochs: Vec<Value> = self
            .epochs
            .iter()
            .map(|(&epoch, s)| {
                let mut by = serde_json::Map::new();
                for (p, row) in PARAMETERS.iter().zip(&s.by_param) {
                    let shown = row
                        .iter()
                        .enumerate()
                        .any(|(i, m)| m.count > 0 && !p.neutral.contains(&i));
                    if !shown {
                        continue;
                    }
                    let buckets: Vec<Value> = row
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.count > 0)
                        .map(|(i, m)| {
                            json!({"bucket": p.labels.get(i).copied().unwrap_or("?"),
                                   "mean_loss": m.value(), "samples": m.count})
                        })
                        .collect();
                    by.insert(
                        p.key.to_owned(),
                        json!({"title": p.title, "buckets": buckets}),
                    );
                }
                let mut classes: Vec<(&i64, &Mean)> = s.by_class.iter().collect();
                classes.sort_by_key(|(c, _)| **c);
                let classes: Vec<Value> = classes
                    .into_iter()
                    .map(|(c, m)| json!({"class": c, "mean_loss": m.value(), "samples": m.count}))
                    .collect();
                let mut e = json!({"epoch": epoch, "mean_loss": s.all.value(),
                       "samples": s.all.count, "loss_by": by, "loss_by_class": classes});
                if !s.by_stream.is_empty() {
                    e["loss_by_stream"] = s
                        .by_stream
                        .iter()
                        .map(|(i, m)| json!({"stream": i, "mean_loss": m.value(), "samples": m.count}))
                        .collect();
                }
                e
            })
            .collect();
        json!({
            "reports": {"losses": self.losses, "unattributed": self.unattributed,
                        "ignored_bad_loss": self.bad_losses, "refused_ids": self.bad_ids},
            "epochs": epochs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(area: f32, hflip: bool, rotation: f32) -> SampleParams {
        SampleParams {
            crop_area: area,
            crop_aspect: 1.0,
            hflip,
            rotation,
            zoom: 1.0,
            ..SampleParams::default()
        }
    }

    #[test]
    fn losses_land_in_their_buckets_and_classes() {
        let log = ParamLog::new(4);
        log.record(0, 2, &params(0.1, false, 0.0));
        log.record(1, 2, &params(0.9, true, 12.0));
        log.record(2, 1, &params(0.9, true, 0.0));
        assert_eq!(log.lookup(2, 2), None, "served in another epoch");
        assert_eq!(log.lookup(3, 2), None, "never served");
        let mut ev = Evaluation::default();
        ev.add(2, log.lookup(0, 2), 7, Some(0), 3.0);
        ev.add(2, log.lookup(1, 2), 7, Some(1), 1.0);
        ev.add(2, log.lookup(2, 2), 8, Some(1), 5.0);
        assert_eq!((ev.losses, ev.unattributed), (3, 1));
        let j = ev.to_json();
        let e = &j["epochs"][0];
        assert_eq!(e["epoch"], 2);
        let area = &e["loss_by"]["crop_area"]["buckets"];
        assert_eq!(area[0]["bucket"], "0–0.2");
        assert_eq!(area[0]["mean_loss"], 3.0);
        assert_eq!(area[1]["bucket"], "0.75–1");
        let rot = &e["loss_by"]["rotation"]["buckets"];
        assert_eq!(rot[1]["bucket"], "10–20°");
        assert!(e["loss_by"].get("brightness").is_none(), "never applied");
        assert_eq!(e["loss_by_class"][0]["class"], 7);
        assert_eq!(e["loss_by_class"][0]["mean_loss"], 2.0);
        // Split by stream of a mixture (the unattributed third loss counts nowhere).
        assert_eq!(e["loss_by_stream"][0]["stream"], 0);
        assert_eq!(e["loss_by_stream"][0]["mean_loss"], 3.0);
        assert_eq!(e["loss_by_stream"][1]["stream"], 1);
        assert_eq!(e["loss_by_stream"][1]["samples"], 1);
    }

    #[test]
    fn only_the_last_epochs_are_kept() {
        let mut ev = Evaluation::default();
        for epoch in 0..6 {
            ev.add(epoch, Some(0), 0, None, 1.0);
        }
        assert_eq!(ev.epochs(), vec![3, 4, 5]);
        ev.add(0, Some(0), 0, None, 1.0);
        assert_eq!(
            ev.epochs(),
            vec![3, 4, 5],
            "a very late report opens no old epoch"
        );
    }
}
