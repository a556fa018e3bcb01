//! Persisted selection state (`--state-dir`): the live scores and the score snapshot each
//! epoch's plan was decided from, so a restarted daemon serving a resumed trainer decides the
//! same epochs.
//!
//! Files in the directory: `run.json` (the fingerprint of the run: dataset size, seed, batch
//! and world size, selection parameters; state of another run is never used), `scores.f32`
//! (the live scores) and `epoch-<e>.f32` (the snapshot of epoch `e`; the last
//! [`KEPT_SNAPSHOTS`] are kept). Score files are `RFSCORE1`, a u64 count, then one
//! little-endian f32 per sample (NaN = unseen). Every file is written to a temporary name and
//! renamed, so a crash leaves the old file or the new one, never half of one.

use std::io;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RFSCORE1";
/// Epoch snapshots kept on disk.
pub const KEPT_SNAPSHOTS: u64 = 4;

/// The state directory of one ring.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
    fingerprint: String,
}

fn encode(values: &[f32]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + values.len() * 4);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(values.len() as u64).to_le_bytes());
    for v in values {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn decode(bytes: &[u8], n: u64) -> Option<Vec<f32>> {
    if bytes.len() < 16 || &bytes[..8] != MAGIC {
        return None;
    }
    let count = u64::from_le_bytes(bytes[8..16].try_into().ok()?);
    if count != n || (bytes.len() - 16) as u64 != n * 4 {
        return None;
    }
    Some(
        bytes[16..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
    )
}

impl StateStore {
    /// Opens (creating, mode 0700) `dir` for the run described by `fingerprint`.
    pub fn open(dir: &Path, fingerprint: String) -> io::Result<StateStore> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(StateStore {
            dir: dir.to_owned(),
            fingerprint,
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    /// Whether the directory holds state of this same run (its `run.json` matches).
    pub fn same_run(&self) -> bool {
        std::fs::read(self.dir.join("run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|v| v["fingerprint"] == self.fingerprint.as_str())
    }

    /// Starts a new run: removes earlier scores and snapshots, records this run's fingerprint.
    pub fn reset(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".f32") {
                std::fs::remove_file(self.dir.join(&*name))?;
            }
        }
        let run = serde_json::json!({"fingerprint": self.fingerprint});
        self.write("run.json", run.to_string().as_bytes())
    }

    /// The live scores of this run, if saved.
    pub fn load_scores(&self, n: u64) -> Option<Vec<f32>> {
        if !self.same_run() {
            return None;
        }
        decode(&std::fs::read(self.dir.join("scores.f32")).ok()?, n)
    }

    /// Saves the live scores.
    pub fn save_scores(&self, values: &[f32]) -> io::Result<()> {
        self.write("scores.f32", &encode(values))
    }

    /// The snapshot epoch `epoch` was decided from, if saved by this run.
    pub fn load_snapshot(&self, epoch: u64, n: u64) -> Option<Vec<f32>> {
        if !self.same_run() {
            return None;
        }
        decode(
            &std::fs::read(self.dir.join(format!("epoch-{epoch}.f32"))).ok()?,
            n,
        )
    }

    /// Saves epoch `epoch`'s snapshot and drops snapshots older than the kept window.
    pub fn save_snapshot(&self, epoch: u64, values: &[f32]) -> io::Result<()> {
        self.write(&format!("epoch-{epoch}.f32"), &encode(values))?;
        if let Some(old) = epoch.checked_sub(KEPT_SNAPSHOTS) {
            let _ = std::fs::remove_file(self.dir.join(format!("epoch-{old}.f32")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_and_snapshots_survive_a_restart_of_the_same_run_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let s = StateStore::open(&path, "run a".into()).unwrap();
        s.reset().unwrap();
        s.save_scores(&[1.0, f32::NAN]).unwrap();
        for e in 1..=5 {
            s.save_snapshot(e, &[e as f32, 0.0]).unwrap();
        }
        let again = StateStore::open(&path, "run a".into()).unwrap();
        let scores = again.load_scores(2).unwrap();
        assert_eq!(scores[0], 1.0);
        assert!(scores[1].is_nan());
        assert_eq!(again.load_snapshot(5, 2).unwrap(), vec![5.0, 0.0]);
        assert_eq!(again.load_snapshot(2, 2).unwrap(), vec![2.0, 0.0]);
        assert!(
            again.load_snapshot(1, 2).is_none(),
            "older than the kept window"
        );
        assert!(again.load_scores(3).is_none(), "other dataset size");
        let other = StateStore::open(&path, "run b".into()).unwrap();
        assert!(other.load_scores(2).is_none());
        other.reset().unwrap();
        assert!(again.load_snapshot(5, 2).is_none());
    }
}
