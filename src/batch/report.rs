//! What happened while one batch was filled: the report a filled batch returns, instead of
//! results passed through shared state and counters diffed around the batch.

/// Why a sample was skipped (and replaced by the next one of its fallback chain).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SkipReason {
    /// Its label could not be read (or is out of range).
    Label,
    /// Its bytes could not be read (a vanished shard, a bad member, a failed decryption).
    Read,
    /// It could not be decoded or augmented (a corrupt or hostile image).
    Process,
}

impl SkipReason {
    /// Every reason, in the order [`BatchReport::skipped_by`] counts them.
    pub const ALL: [SkipReason; 3] = [SkipReason::Label, SkipReason::Read, SkipReason::Process];

    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::Label => "label",
            SkipReason::Read => "read",
            SkipReason::Process => "process",
        }
    }
}

/// One skipped sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleFailure {
    /// The sample's id in the dataset.
    pub sample_id: u64,
    /// Why it was skipped.
    pub reason: SkipReason,
    /// The failure, naming the shard and member.
    pub message: String,
}

/// What happened to one batch: how many samples were written and which were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Samples decoded, augmented and written (one per row).
    pub written: u64,
    /// Every skipped sample, first choices and fallbacks alike, row by row (within a row, in
    /// the order tried). A sample may appear more than once: as one row's first choice and as
    /// another row's fallback.
    pub failures: Vec<SampleFailure>,
}

impl BatchReport {
    /// Samples skipped (failures, counting repeats).
    pub fn skipped(&self) -> u64 {
        self.failures.len() as u64
    }

    /// Samples skipped for `reason`.
    pub fn skipped_by(&self, reason: SkipReason) -> u64 {
        self.failures.iter().filter(|f| f.reason == reason).count() as u64
    }

    /// The ids of the skipped samples, in report order.
    pub fn failed_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.failures.iter().map(|f| f.sample_id)
    }

    /// The last failure's message (in report order), if any.
    pub fn last_error(&self) -> Option<&str> {
        self.failures.last().map(|f| f.message.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_counts_by_reason_and_keeps_the_order() {
        let fail = |sample_id, reason| SampleFailure {
            sample_id,
            reason,
            message: format!("sample {sample_id}"),
        };
        let report = BatchReport {
            written: 4,
            failures: vec![
                fail(3, SkipReason::Read),
                fail(9, SkipReason::Process),
                fail(3, SkipReason::Read),
            ],
        };
        assert_eq!(report.skipped(), 3);
        assert_eq!(
            SkipReason::ALL.map(|r| report.skipped_by(r)),
            [0, 2, 1],
            "label, read, process"
        );
        assert_eq!(report.failed_ids().collect::<Vec<_>>(), [3, 9, 3]);
        assert_eq!(report.last_error(), Some("sample 3"));
        assert_eq!(BatchReport::default().last_error(), None);
    }
}
