//! A Rust training loop fed by ringfeed: attach to one lane of a running `ringfeed serve`,
//! read every batch in place (no copy), remember where to resume, and stop when the run ends.
//!
//! ```sh
//! target/release/ringfeed serve --epochs 2 --exit-when-done &
//! cargo run --release --example train_loop -- default
//! ```
//!
//! The lane is `LOCAL_RANK` (0 without torchrun-style variables); `RANK` / `WORLD_SIZE`, when set,
//! must be what the lane serves. `RESUME=EPOCH:INDEX` starts
//! at that batch: the producer seeks there (nothing is replayed), as after a checkpoint.

use std::time::Instant;

use ringfeed::ring::{AttachOptions, Batch, ConsumeError, Consumer};

/// Where to resume after `batch`: the batch after it, in the next epoch after the last one.
fn next_position(batch: &Batch<'_>) -> (u64, u64) {
    if batch.last_of_epoch() {
        (batch.epoch() + 1, 0)
    } else {
        (batch.epoch(), batch.index() + 1)
    }
}

/// `EPOCH:INDEX` → `(epoch, index)`.
fn parse_position(text: &str) -> Result<(u64, u64), String> {
    let (epoch, index) = text
        .split_once(':')
        .ok_or_else(|| format!("RESUME={text:?}: expected EPOCH:INDEX, e.g. 1:40"))?;
    let number = |what: &str, v: &str| {
        v.parse::<u64>()
            .map_err(|e| format!("RESUME={text:?}: {what} {v:?} is not a number ({e})"))
    };
    Ok((number("epoch", epoch)?, number("index", index)?))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_loop: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "default".to_owned());
    let lane = match std::env::var("LOCAL_RANK") {
        Ok(v) => v
            .parse()
            .map_err(|e| format!("LOCAL_RANK={v:?} is not a lane number ({e})"))?,
        Err(_) => 0,
    };
    // Under torchrun, RANK and WORLD_SIZE are checked against what the lane serves.
    let mut options = AttachOptions::new(&name, lane).with_torchrun_env();
    if let Ok(at) = std::env::var("RESUME") {
        options.resume = Some(parse_position(&at)?);
    }
    let consumer = Consumer::attach_with(&options)?;
    let shapes: Vec<String> = consumer
        .layout()
        .tensors
        .iter()
        .map(|t| format!("{} {:?}{:?}", t.name, t.dtype, t.shape))
        .collect();
    println!(
        "attached to ring {name:?} lane {lane}: {}",
        shapes.join(", ")
    );

    let started = Instant::now();
    let (mut batches, mut samples) = (0u64, 0u64);
    let mut resume_at = options.resume.unwrap_or((0, 0));
    loop {
        let batch = match consumer.next() {
            Ok(Some(batch)) => batch,
            Ok(None) => break, // the producer finished every epoch
            Err(ConsumeError::ProducerGone { reason, .. }) => {
                return Err(format!(
                    "producer gone ({reason}); resume later with RESUME={}:{}",
                    resume_at.0, resume_at.1
                )
                .into());
            }
            Err(e) => return Err(e.into()),
        };
        // Views straight into shared memory; a framework would wrap these slices as tensors.
        let images: &[f32] = batch.tensor("images")?;
        let labels: &[i64] = batch.tensor("labels")?;
        let count = batch.count() as usize;
        let mean = images.iter().map(|&v| f64::from(v)).sum::<f64>() / images.len().max(1) as f64;
        println!(
            "epoch {} batch {}: {count} samples, first labels {:?}, mean pixel {mean:+.3}",
            batch.epoch(),
            batch.index(),
            &labels[..count.min(4)],
        );
        batches += 1;
        samples += count as u64;
        resume_at = next_position(&batch);
        // Dropping `batch` here hands its slot back to the producer.
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "{batches} batches, {samples} samples in {seconds:.2} s ({:.0} samples/s); next position {}:{}",
        samples as f64 / seconds,
        resume_at.0,
        resume_at.1
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_position;

    #[test]
    fn resume_positions_parse_or_explain() {
        assert_eq!(parse_position("3:17"), Ok((3, 17)));
        let err = parse_position("3-17").unwrap_err();
        assert!(err.contains("expected EPOCH:INDEX"), "{err}");
        let err = parse_position("3:x").unwrap_err();
        assert!(err.contains("index \"x\""), "{err}");
    }
}
