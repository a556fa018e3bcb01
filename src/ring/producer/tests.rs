//! The producer's claim and reclaim against a hostile lane page (format 2.0): whatever a
//! consumer writes into its page, the producer claims only `FREE` slots and the `READY` slots
//! of that lane whose batch the page names as released, and a reclaim frees exactly those
//! and redelivers exactly the taken ones. The page is written here through the producer's
//! own mapping of it, as the consumer's shared mapping would.

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::state::{lock, Attachment};
use super::{BatchMeta, Producer};
use crate::ring::layout::{DType, RingSpec, TensorSpec};
use crate::ring::runtime_dir::RuntimeDir;
use crate::ring::slot::{self, FLAG_REDELIVERED};

const SLOTS: u32 = 3;

fn ring(name: &str) -> (tempfile::TempDir, Producer) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let spec = RingSpec::new(
        name,
        2,
        SLOTS,
        1,
        vec![TensorSpec {
            name: "x".into(),
            dtype: DType::U8,
            shape: vec![1],
        }],
    );
    let p = Producer::create(&spec, &dir).unwrap();
    (tmp, p)
}

/// Fills every slot of `lane` with a published batch; returns their `seq`s by slot.
fn fill(p: &Producer, lane: u32) -> Vec<u64> {
    for i in 0..SLOTS {
        p.try_claim(lane).expect("a free slot").publish(BatchMeta {
            epoch: 0,
            index: u64::from(i),
            count: 1,
            last_of_epoch: false,
        });
    }
    (0..SLOTS).map(|s| p.shared.slot(lane, s).seq()).collect()
}

/// Registers an attach of `lane` as the service would; the returned stream is the
/// "consumer's" end (dropping it closes nothing the producer watches here).
fn attach(p: &Producer, lane: u32) -> (Arc<Attachment>, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let a = Arc::new(Attachment::create(&p.shared.layout, lane).unwrap());
    p.shared.register(
        &mut lock(&p.shared.lanes),
        lane,
        std::process::id(),
        Arc::new(ours),
        a.clone(),
    );
    (a, theirs)
}

/// Sets its flag however a test ends, so a failed assertion never leaves a helper thread of
/// a scope running (and the scope waiting for it).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn claimed_slot(p: &Producer, lane: u32) -> Option<u32> {
    let w = p.try_claim(lane)?;
    let s = w.slot;
    drop(w); // back to FREE
    Some(s)
}

#[test]
fn a_hostile_page_frees_only_the_batches_it_names_of_its_own_lane() {
    let (_t, p) = ring("hostile-page");
    let seqs0 = fill(&p, 0);
    fill(&p, 1);
    let (a, _peer) = attach(&p, 0);
    let page = &a.page;
    // Noise: every value but the slots' own seqs, and huge counters.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        for s in 0..SLOTS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let forged = if seqs0.contains(&x) { x + 100 } else { x };
            page.released_seq(s)
                .store(forged, std::sync::atomic::Ordering::Relaxed);
            page.taken_seq(s)
                .store(x, std::sync::atomic::Ordering::Relaxed);
        }
        page.released()
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        page.consumer_wait_ns()
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(claimed_slot(&p, 0), None, "noise frees nothing");
        assert_eq!(claimed_slot(&p, 1), None, "nor anything of another lane");
    }
    // The seq of the batch each slot will hold after its next publish, or of the one before,
    // frees nothing either: only the exact batch in the slot.
    for delta in [i64::from(SLOTS), -i64::from(SLOTS)] {
        for s in 0..SLOTS {
            page.released_seq(s).store(
                seqs0[s as usize].wrapping_add_signed(delta),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        assert_eq!(claimed_slot(&p, 0), None);
    }
    // Statistics copies survive huge counters (wrapping, no panic).
    let stats = p.stats();
    assert_eq!(stats.lanes[0].released, u64::MAX);
    // A forged release of slot 1's batch (never taken) frees exactly slot 1: only the
    // forger's own lane loses a batch.
    page.released_seq(1)
        .store(seqs0[1], std::sync::atomic::Ordering::Release);
    let w = p.try_claim(0).expect("the released batch's slot");
    assert_eq!(w.slot, 1);
    assert_eq!(p.shared.slot(0, 1).state(), slot::WRITING);
    assert_eq!(claimed_slot(&p, 0), None, "one release frees one slot");
    drop(w);
    assert_eq!(claimed_slot(&p, 1), None, "lane 1 untouched");
    for s in 0..SLOTS {
        assert_eq!(p.shared.slot(1, s).state(), slot::READY);
    }
}

#[test]
fn reclaim_frees_the_released_and_redelivers_the_taken() {
    let (_t, p) = ring("reclaim-page");
    let seqs = fill(&p, 0);
    let (a, peer) = attach(&p, 0);
    let page = &a.page;
    use std::sync::atomic::Ordering::{Relaxed, Release};
    // Slot 0: taken and released. Slot 1: taken, still held. Slot 2: never taken.
    page.taken_seq(0).store(seqs[0], Relaxed);
    page.released_seq(0).store(seqs[0], Release);
    page.taken_seq(1).store(seqs[1], Relaxed);
    page.taken().store(2, Relaxed);
    page.released().store(1, Relaxed);
    let mut conns = lock(&p.shared.lanes);
    p.shared.reclaim_locked(&mut conns, 0);
    drop(conns);
    drop(peer);
    let states: Vec<u32> = (0..SLOTS).map(|s| p.shared.slot(0, s).state()).collect();
    assert_eq!(states, [slot::FREE, slot::READY, slot::READY]);
    let flags: Vec<bool> = (0..SLOTS)
        .map(|s| p.shared.slot(0, s).meta().flags & FLAG_REDELIVERED != 0)
        .collect();
    assert_eq!(
        flags,
        [false, true, false],
        "only the held batch is redelivered"
    );
    assert_eq!(
        p.stats().lanes[0].released,
        1,
        "the page's count folded into the base"
    );
    assert_eq!(p.stats().lanes[0].consumer_pid, 0);
    // The old page is no longer read: releasing the held batch there now frees nothing.
    page.released_seq(1).store(seqs[1], Release);
    assert_eq!(
        claimed_slot(&p, 0),
        Some(0),
        "only the slot freed at reclaim"
    );
    let w = p.try_claim(0).unwrap();
    assert_eq!(w.slot, 0);
    assert_eq!(claimed_slot(&p, 0), None);
    drop(w);
    // The next attach's page starts blank: nothing is released there.
    let (next, _peer) = attach(&p, 0);
    assert_eq!(next.page.released().load(Relaxed), 0);
    assert_eq!(
        p.stats().lanes[0].released,
        1,
        "totals continue from the base"
    );
}

/// A consumer flooding its doorbell while its lane has nothing to free: `claim_any` waits out
/// its timeout without spinning (a doorbell that keeps ringing for nothing is left out of the
/// next wait), and still claims at once when a slot of another lane is released.
#[test]
fn a_doorbell_flood_does_not_make_claim_any_spin() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let (_t, p) = ring("flood");
    fill(&p, 0);
    let seqs1 = fill(&p, 1);
    let (hostile, _peer0) = attach(&p, 0);
    let (honest, _peer1) = attach(&p, 1);
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let _stop = StopOnDrop(&stop);
        sc.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let _ = rustix::io::write(&hostile.doorbell, &1u64.to_le_bytes());
            }
        });
        let cpu = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let (wall0, cpu0) = (Instant::now(), cpu());
        assert!(p.claim_any(&[0, 1], Duration::from_millis(300)).is_none());
        let (wall, spent) = (wall0.elapsed(), cpu() - cpu0);
        assert!(wall >= Duration::from_millis(300));
        assert!(
            spent * 4 < wall,
            "claim_any used {spent:?} of CPU in {wall:?} under a doorbell flood"
        );
        // An honest release on lane 1 is claimed although lane 0 keeps ringing.
        honest
            .page
            .released_seq(2)
            .store(seqs1[2], std::sync::atomic::Ordering::Release);
        let _ = rustix::io::write(&honest.doorbell, &1u64.to_le_bytes());
        let w = p
            .claim_any(&[0, 1], Duration::from_secs(5))
            .expect("lane 1's released slot");
        assert_eq!((w.lane(), w.slot), (1, 2));
        drop(w);
    });
}

/// Two producer threads race for the released slots of a lane while a third keeps syncing the
/// lane (`stats`, which frees released slots, as the heartbeat does): every released slot is
/// claimed exactly once per round, and a slot republished meanwhile is never claimed on the
/// strength of its previous batch's release.
#[test]
fn racing_claims_of_released_slots_are_exclusive() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_t, p) = ring("race");
    fill(&p, 0);
    let (a, _peer) = attach(&p, 0);
    let done = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let _done = StopOnDrop(&done);
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let _ = p.stats();
            }
        });
        for round in 0..300u64 {
            let seqs: Vec<u64> = (0..SLOTS).map(|s| p.shared.slot(0, s).seq()).collect();
            for (s, seq) in seqs.iter().enumerate() {
                a.page.released_seq(s as u32).store(*seq, Ordering::Release);
            }
            let won: Vec<Vec<_>> = std::thread::scope(|inner| {
                let racers: Vec<_> = (0..2)
                    .map(|_| {
                        inner.spawn(|| {
                            let mut mine = Vec::new();
                            while let Some(w) = p.try_claim(0) {
                                mine.push(w);
                            }
                            mine
                        })
                    })
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            let mut slots: Vec<u32> = won.iter().flatten().map(|w| w.slot).collect();
            slots.sort_unstable();
            assert_eq!(slots, (0..SLOTS).collect::<Vec<_>>(), "round {round}");
            for w in won.into_iter().flatten() {
                w.publish(BatchMeta {
                    epoch: 0,
                    index: round,
                    count: 1,
                    last_of_epoch: false,
                });
            }
            // Republished: the page still names the previous batches, which frees nothing.
            assert!(p.try_claim(0).is_none(), "round {round}");
        }
    });
}
