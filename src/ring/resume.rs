//! What a resume position is a position *in* (docs/ring-format.md §7, 1.3): the producer's
//! [`Fingerprint`] of everything that defines an epoch's sample order and its batches, and
//! the rule that maps a saved position onto this producer or refuses it.
//!
//! Brief overview: the producer publishes its fingerprint in the `attach` and `info` replies;
//! a client saves it with its position (`sample`: samples of the epoch's global order
//! consumed before the next batch) and sends both back in `resume`. [`plan_resume`] then
//! refuses a state whose order differs (seed, dataset, shuffle, selection: the same `sample`
//! would be other samples), maps `sample` to this producer's batch index when only the
//! batching differs (world size, batch size, drop-last), and only warns when the augmentation
//! differs (same samples, other pixels).
//!
//! Elastic resume: the epoch's order does not depend on the world size (global batch `i` is
//! positions `i·G .. (i+1)·G` of one order, `G = world_size × batch_size`), so a job saved at
//! world size 4 resumes at world size 2 or 8 on the same position. With the same global batch
//! size `G` the saved `sample` is a whole number of global batches, and the rest of the epoch
//! is served exactly once across the new ranks. When `G` changes too, the rule is the one of a
//! batch-size change: the resume starts at the new global batch that holds `sample`
//! (`sample / G`); if `sample` falls inside it, the `sample mod G` samples before it are served
//! a second time (never skipped), and the warning says how many.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Everything that defines a ring's epoch order and batches, as the `fingerprint` object of
/// the `attach` / `info` replies and of a client's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct Fingerprint {
    /// `[sampling] seed`.
    pub seed: u64,
    /// Digest (16 hex digits) of the dataset's identity: shard file names and sizes, and
    /// every indexed sample's member name, size and label, in order (streams: with their
    /// names and weights).
    pub dataset: String,
    /// Samples in one epoch's order (the dataset size, or a mixture's `samples-per-epoch`).
    pub samples: u64,
    /// `[sampling] shuffle`, as written in the configuration.
    pub shuffle: String,
    /// `[selection] mode` (`"none"` or `"infobatch"`).
    pub selection: String,
    /// Ranks in the job.
    pub world_size: u32,
    /// Samples per batch.
    pub batch_size: u32,
    /// `[sampling] drop-last`.
    pub drop_last: bool,
    /// Digest (16 hex digits) of the `[augment]` tables (and the streams' own).
    pub augment: String,
}

/// A resume position and what it is a position in: what a consumer saves in a checkpoint and
/// passes back ([`AttachOptions::resume_state`](super::AttachOptions::resume_state)).
/// Serialises to the same JSON object as the Python client's `state_dict()` (which adds
/// `lane` and `generation`; unknown keys are ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Epoch of the next batch wanted.
    pub epoch: u64,
    /// Its index within the epoch, for this lane.
    pub index: u64,
    /// Samples of the epoch's global order consumed before it (all ranks):
    /// `index × batch_size × world_size`; `None` in a state saved before 1.3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<u64>,
    /// The producer fingerprint the position was saved under (kept as raw JSON, as saved);
    /// `None` in a state saved before 1.3: the producer then cannot check it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Value>,
}

impl ResumeState {
    /// The state of the next batch `(epoch, index)` on a producer with `fingerprint`.
    pub fn at(epoch: u64, index: u64, fingerprint: Option<&Fingerprint>) -> ResumeState {
        ResumeState {
            epoch,
            index,
            sample: fingerprint.map(|f| {
                index
                    .saturating_mul(u64::from(f.batch_size))
                    .saturating_mul(u64::from(f.world_size.max(1)))
            }),
            fingerprint: fingerprint.and_then(|f| serde_json::to_value(f).ok()),
        }
    }
}

/// Fields whose difference changes which sample sits at a position of the epoch's order.
const ORDER_FIELDS: [&str; 5] = ["seed", "dataset", "samples", "shuffle", "selection"];
/// Fields whose difference only changes how the order is cut into batches (and dealt to
/// ranks): the world size is one, as the order is the same for every world size.
const BATCH_FIELDS: [&str; 3] = ["world_size", "batch_size", "drop_last"];

/// Where a resumed lane starts, and what the client should be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// Batch index within the epoch, in this producer's batches.
    pub index: u64,
    /// The first sample position of that batch (≤ the saved position when it fell mid-batch).
    pub sample: u64,
    /// Differences the client should hear about (the augmentation changed, the batching was
    /// remapped).
    pub warnings: Vec<String>,
}

/// A refused resume: one `(field, saved, serving)` per difference, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The differing fields with the saved and the serving value.
    pub fields: Vec<(String, String, String)>,
    /// The human-readable refusal.
    pub message: String,
}

impl Fingerprint {
    /// The fields as strings, for comparison and messages.
    fn field(&self, key: &str) -> Option<String> {
        serde_json::to_value(self).ok()?.get(key).map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }
}

fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Decides where a resume of `epoch`/`index`, saved with `saved` fingerprint (any JSON: a
/// client's state may be hostile or from another version) at order position `sample`, starts
/// on a producer whose fingerprint is `ours`. `Err` names every field that makes the saved
/// position mean other samples.
pub fn plan_resume(
    ours: &Fingerprint,
    saved: &Value,
    sample: Option<u64>,
    index: u64,
) -> Result<ResumePlan, Mismatch> {
    let refuse = |message: String, fields| Err(Mismatch { fields, message });
    let Some(saved) = saved.as_object() else {
        return refuse(
            format!("cannot resume: the state's fingerprint is not an object ({saved})"),
            Vec::new(),
        );
    };
    let mut order = Vec::new();
    for key in ORDER_FIELDS {
        let Some(now) = ours.field(key) else { continue };
        match saved.get(key) {
            None => order.push((key.to_owned(), "(missing)".to_owned(), now)),
            Some(v) if shown(v) != now => order.push((key.to_owned(), shown(v), now)),
            Some(_) => {}
        }
    }
    if !order.is_empty() {
        let list: Vec<String> = order
            .iter()
            .map(|(k, old, new)| format!("{k} {old} (saved) vs {new} (this daemon)"))
            .collect();
        return refuse(
            format!(
                "cannot resume: the state was saved for another sample order: {}. Restart the \
                 daemon with the saved values, or start a fresh run without the state",
                list.join("; ")
            ),
            order,
        );
    }
    let mut warnings = Vec::new();
    let batching: Vec<(String, String, String)> = BATCH_FIELDS
        .iter()
        .filter_map(|&key| {
            let now = ours.field(key)?;
            let old = saved.get(key).map_or("(missing)".to_owned(), shown);
            (old != now).then(|| (key.to_owned(), old, now))
        })
        .collect();
    let global = u64::from(ours.batch_size) * u64::from(ours.world_size.max(1));
    let plan_index = if batching.is_empty() {
        index
    } else {
        let Some(sample) = sample else {
            let (k, old, new) = &batching[0];
            return refuse(
                format!(
                    "cannot resume: {k} changed ({old} → {new}) and the state has no `sample` \
                     position to map"
                ),
                batching,
            );
        };
        let mapped = sample / global;
        let list: Vec<String> = batching
            .iter()
            .map(|(k, old, new)| format!("{k} {old} → {new}"))
            .collect();
        warnings.push(format!(
            "{}: resuming at sample {sample} of the epoch's order = batch {mapped}{}",
            list.join(", "),
            if sample % global == 0 {
                String::new()
            } else {
                format!(
                    " (it falls mid-batch: the batch starts at sample {}, so {} samples are \
                     served again)",
                    mapped * global,
                    sample % global
                )
            }
        ));
        mapped
    };
    if let Some(old) = saved.get("augment") {
        if shown(old) != ours.augment {
            warnings.push(format!(
                "the [augment] configuration changed since the state was saved (digest {} → {}): \
                 same samples, other pixels",
                shown(old),
                ours.augment
            ));
        }
    }
    Ok(ResumePlan {
        index: plan_index,
        sample: plan_index.saturating_mul(global),
        warnings,
    })
}

/// FNV-1a, 64 bits: a digest that is the same on every machine and release (the standard
/// library's hashers promise neither).
#[derive(Debug, Clone)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    /// Feeds `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Digest {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    /// Feeds a length-prefixed string (so `"ab","c"` and `"a","bc"` differ).
    pub fn str(&mut self, s: &str) -> &mut Digest {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// Feeds a number.
    pub fn u64(&mut self, v: u64) -> &mut Digest {
        self.bytes(&v.to_le_bytes())
    }

    /// The digest as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Fingerprint {
        Fingerprint {
            seed: 1,
            dataset: "00aa".into(),
            samples: 100,
            shuffle: "full".into(),
            selection: "none".into(),
            world_size: 2,
            batch_size: 8,
            drop_last: false,
            augment: "11bb".into(),
        }
    }

    fn saved(f: &Fingerprint) -> Value {
        serde_json::to_value(f).unwrap()
    }

    #[test]
    fn same_fingerprint_keeps_the_index() {
        let p = plan_resume(&ours(), &saved(&ours()), Some(48), 3).unwrap();
        assert_eq!((p.index, p.sample, p.warnings.len()), (3, 48, 0));
    }

    #[test]
    fn a_batch_size_change_maps_by_sample_and_says_so() {
        let old = Fingerprint {
            batch_size: 4,
            ..ours()
        };
        // 9 batches of 4 on 2 ranks = sample 72 = batch 4 of 16 (72 / 16 = 4.5: mid-batch).
        let p = plan_resume(&ours(), &saved(&old), Some(72), 9).unwrap();
        assert_eq!((p.index, p.sample), (4, 64));
        assert!(
            p.warnings[0].contains("batch_size 4 → 8"),
            "{:?}",
            p.warnings
        );
        assert!(p.warnings[0].contains("mid-batch"), "{:?}", p.warnings);
        let exact = plan_resume(&ours(), &saved(&old), Some(80), 10).unwrap();
        assert_eq!(exact.index, 5);
        assert!(!exact.warnings[0].contains("mid-batch"));
        assert!(plan_resume(&ours(), &saved(&old), None, 9).is_err());
    }

    #[test]
    fn an_order_change_is_refused_naming_every_field() {
        let old = Fingerprint {
            seed: 2,
            dataset: "00ab".into(),
            world_size: 4,
            ..ours()
        };
        let e = plan_resume(&ours(), &saved(&old), Some(0), 0).unwrap_err();
        let names: Vec<_> = e.fields.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(
            names,
            ["seed", "dataset"],
            "the world size is no order field"
        );
        assert!(
            e.message.contains("seed 2 (saved) vs 1 (this daemon)"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("dataset 00ab (saved) vs 00aa"),
            "{}",
            e.message
        );
    }

    #[test]
    fn a_world_size_change_with_the_same_global_batch_resumes_at_the_same_sample() {
        // Saved at world 4 × batch 4 (global 16) after 3 batches per rank: sample 48.
        let at4 = Fingerprint {
            world_size: 4,
            batch_size: 4,
            ..ours()
        };
        for (world, batch) in [(2, 8), (8, 2), (16, 1), (1, 16)] {
            let now = Fingerprint {
                world_size: world,
                batch_size: batch,
                ..ours()
            };
            let p = plan_resume(&now, &saved(&at4), Some(48), 3).unwrap();
            assert_eq!((p.index, p.sample), (3, 48), "world {world} × {batch}");
            assert!(
                p.warnings[0].contains(&format!("world_size 4 → {world}")),
                "{:?}",
                p.warnings
            );
            assert!(!p.warnings[0].contains("mid-batch"), "{:?}", p.warnings);
        }
    }

    #[test]
    fn a_global_batch_change_resumes_at_the_batch_holding_the_sample() {
        // World 4 × 4 = 16 at sample 48 → world 2 × 5 = 10: batch 4 starts at 40, so the 8
        // samples 40..48 are served again (never skipped); the warning says so.
        let at4 = Fingerprint {
            world_size: 4,
            batch_size: 4,
            ..ours()
        };
        let now = Fingerprint {
            world_size: 2,
            batch_size: 5,
            ..ours()
        };
        let p = plan_resume(&now, &saved(&at4), Some(48), 3).unwrap();
        assert_eq!((p.index, p.sample), (4, 40));
        let text = &p.warnings[0];
        assert!(
            text.contains("world_size 4 → 2, batch_size 4 → 5"),
            "{text}"
        );
        assert!(text.contains("so 8 samples are served again"), "{text}");
        // A world change with no saved position cannot be mapped.
        assert!(plan_resume(&now, &saved(&at4), None, 3).is_err());
    }

    #[test]
    fn hostile_fingerprints_are_refused_not_trusted() {
        for bad in [
            json!(null),
            json!(7),
            json!("seed"),
            json!([1, 2]),
            json!({}),
            json!({"seed": "1"}),
        ] {
            let r = plan_resume(&ours(), &bad, Some(u64::MAX), u64::MAX);
            assert!(r.is_err(), "{bad} accepted");
        }
        // Every order field equal, junk elsewhere and a huge sample: mapped without overflow.
        let mut v = saved(&ours());
        v["batch_size"] = json!("x");
        v["extra"] = json!({"deep": [1]});
        let p = plan_resume(&ours(), &v, Some(u64::MAX), 0).unwrap();
        assert_eq!(p.index, u64::MAX / 16);
    }

    #[test]
    fn an_augment_change_only_warns() {
        let old = Fingerprint {
            augment: "ffff".into(),
            ..ours()
        };
        let p = plan_resume(&ours(), &saved(&old), Some(16), 1).unwrap();
        assert_eq!(p.index, 1);
        assert!(p.warnings[0].contains("[augment]"));
    }

    #[test]
    fn digest_is_pinned() {
        assert_eq!(Digest::default().hex(), "cbf29ce484222325");
        assert_eq!(Digest::default().bytes(b"a").hex(), "af63dc4c8601ec8c");
        assert_ne!(
            Digest::default().str("ab").str("c").hex(),
            Digest::default().str("a").str("bc").hex()
        );
    }
}
