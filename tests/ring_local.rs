//! Producer and consumers in one process: ordering, zero copy, holding several batches, lane
//! independence, end of stream, seeks, refusals. Crash behaviour with real processes lives in
//! `ring_crash.rs`.

use std::time::{Duration, Instant};

use ringfeed::ring::{
    AttachError, AttachOptions, BatchMeta, ConsumeError, Consumer, DType, Producer, ProducerState,
    RingCreateError, RingSpec, RuntimeDir, TensorError, TensorSpec,
};

fn spec(name: &str, lanes: u32, slots: u32) -> RingSpec {
    let b = 4u32;
    RingSpec {
        batches_per_epoch: 100,
        epochs: 1,
        seed: 1,
        samples_per_epoch: 400,
        ..RingSpec::new(
            name,
            lanes,
            slots,
            b,
            vec![
                TensorSpec {
                    name: "images".into(),
                    dtype: DType::F32,
                    shape: vec![b.into(), 3, 4, 4],
                },
                TensorSpec {
                    name: "labels".into(),
                    dtype: DType::I64,
                    shape: vec![b.into()],
                },
            ],
        )
    }
}

fn setup(name: &str, lanes: u32, slots: u32) -> (tempfile::TempDir, RuntimeDir, Producer) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let p = Producer::create(&spec(name, lanes, slots), &dir).unwrap();
    (tmp, dir, p)
}

fn attach(dir: &RuntimeDir, name: &str, lane: u32) -> Result<Consumer, AttachError> {
    let mut o = AttachOptions::new(name, lane);
    o.dir = Some(dir.clone());
    Consumer::attach_with(&o)
}

/// Publishes batch `(0, index)` into `lane`, labels = index*10 + sample.
fn publish(p: &Producer, lane: u32, index: u64) {
    let mut w = p.try_claim(lane).expect("free slot");
    let mut t = w.tensors_mut();
    for (i, chunk) in t[1].chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(index as i64 * 10 + i as i64).to_le_bytes());
    }
    t[0].fill(index as u8);
    w.publish(BatchMeta {
        epoch: 0,
        index,
        count: 4,
        last_of_epoch: false,
    });
}

#[test]
fn batches_arrive_in_order_zero_copy_and_several_can_be_held() {
    let (_t, dir, p) = setup("order", 2, 3);
    for i in 0..3 {
        publish(&p, 0, i);
    }
    assert!(
        p.try_claim(0).is_none(),
        "all slots of lane 0 are READY: none may be claimed"
    );
    let c = attach(&dir, "order", 0).unwrap();
    assert_eq!(c.generation(), p.stats().generation);
    let held: Vec<_> = (0..3).map(|_| c.next().unwrap().unwrap()).collect();
    for (i, b) in held.iter().enumerate() {
        assert_eq!(
            (b.seq(), b.epoch(), b.index(), b.count()),
            (i as u64 + 1, 0, i as u64, 4)
        );
        assert!(!b.redelivered());
        assert!(
            b.still_held(),
            "the lane page records the batch as taken, not released"
        );
        let labels = b.tensor::<i64>("labels").unwrap();
        assert_eq!(
            labels,
            &[
                i as i64 * 10,
                i as i64 * 10 + 1,
                i as i64 * 10 + 2,
                i as i64 * 10 + 3
            ]
        );
        let images = b.tensor::<f32>("images").unwrap();
        assert_eq!(images.len(), 4 * 3 * 4 * 4);
        let range = c.data_address_range();
        let ptr = images.as_ptr() as usize;
        assert!(
            range.contains(&ptr) && range.contains(&(ptr + 4 * images.len() - 1)),
            "view lies inside the mapping: zero copy"
        );
        assert!(b.tensor_bytes(0).iter().all(|&x| x == i as u8));
    }
    assert!(
        p.try_claim(0).is_none(),
        "held slots are never handed to the producer"
    );
    assert!(p.try_claim(1).is_some(), "lane 1 is independent of lane 0");
    let stats = p.stats();
    assert_eq!(
        (
            stats.lanes[0].held,
            stats.lanes[0].ready,
            stats.lanes[0].published
        ),
        (3, 0, 3)
    );
    drop(held);
    assert_eq!(p.stats().lanes[0].released, 3);
    assert!(p.try_claim(0).is_some(), "released slots are free again");
}

#[test]
fn typed_views_check_name_and_dtype() {
    let (_t, dir, p) = setup("typed", 1, 1);
    publish(&p, 0, 0);
    let c = attach(&dir, "typed", 0).unwrap();
    let b = c.next().unwrap().unwrap();
    assert!(matches!(
        b.tensor::<i64>("images"),
        Err(TensorError::DTypeMismatch {
            stored: DType::F32,
            ..
        })
    ));
    assert!(matches!(
        b.tensor::<u8>("nope"),
        Err(TensorError::NoSuchTensor { .. })
    ));
}

#[test]
fn a_slow_lane_does_not_block_or_reorder_another() {
    let (_t, dir, p) = setup("lanes", 2, 2);
    let slow = attach(&dir, "lanes", 0).unwrap();
    let fast = attach(&dir, "lanes", 1).unwrap();
    publish(&p, 0, 0);
    publish(&p, 0, 1);
    let _stuck: Vec<_> = (0..2).map(|_| slow.next().unwrap().unwrap()).collect();
    // Lane 0 is full and held; lane 1 keeps flowing through many slot reuses.
    for i in 0..20 {
        let w = p
            .claim_any(&[0, 1], Duration::from_secs(5))
            .expect("lane 1 has room");
        assert_eq!(w.lane(), 1);
        drop(w);
        publish(&p, 1, i);
        let b = fast.next().unwrap().unwrap();
        assert_eq!((b.seq(), b.index()), (i + 1, i));
    }
}

#[test]
fn finish_ends_the_stream_after_the_ready_batches() {
    let (_t, dir, p) = setup("finish", 1, 2);
    let c = attach(&dir, "finish", 0).unwrap();
    publish(&p, 0, 0);
    publish(&p, 0, 1);
    p.finish();
    assert_eq!(p.stats().state, Some(ProducerState::Finished));
    assert_eq!(c.next().unwrap().unwrap().index(), 0);
    assert_eq!(c.next().unwrap().unwrap().index(), 1);
    assert!(c.next().unwrap().is_none());
}

#[test]
fn timeout_and_producer_stop_are_reported() {
    let (_t, dir, p) = setup("stop", 1, 1);
    let c = attach(&dir, "stop", 0).unwrap();
    assert!(matches!(
        c.next_timeout(Duration::from_millis(30)),
        Err(ConsumeError::Timeout { .. })
    ));
    drop(p);
    assert!(matches!(
        c.next_timeout(Duration::from_secs(5)),
        Err(ConsumeError::ProducerGone { .. })
    ));
    assert!(
        !dir.socket_path("stop").exists() && !dir.lock_path("stop").exists(),
        "clean drop removes .sock and .lock"
    );
}

#[test]
fn failure_carries_last_error() {
    let (_t, dir, p) = setup("fail", 1, 1);
    let c = attach(&dir, "fail", 0).unwrap();
    p.fail("disk on fire");
    match c.next_timeout(Duration::from_secs(5)) {
        Err(ConsumeError::ProducerGone { reason, .. }) => {
            assert!(reason.contains("disk on fire"), "{reason}")
        }
        other => panic!(
            "expected ProducerGone, got {:?}",
            other.map(|b| b.map(|b| b.seq()))
        ),
    };
}

#[test]
fn second_producer_is_refused_with_the_pid() {
    let (_t, dir, p) = setup("dup", 1, 1);
    match Producer::create(&spec("dup", 1, 1), &dir) {
        Err(e @ RingCreateError::AlreadyRunning { .. }) => {
            assert!(
                e.to_string().contains(&std::process::id().to_string()),
                "{e}"
            );
        }
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    publish(&p, 0, 0);
    let c = attach(&dir, "dup", 0).unwrap();
    assert_eq!(
        c.next().unwrap().unwrap().seq(),
        1,
        "the live ring is undisturbed"
    );
}

#[test]
fn a_held_lane_refuses_a_second_consumer_and_bad_lanes_are_refused() {
    let (_t, dir, _p) = setup("busy", 1, 1);
    let _c = attach(&dir, "busy", 0).unwrap();
    match attach(&dir, "busy", 0) {
        Err(AttachError::Refused { reason, .. }) => {
            assert!(reason.contains(&std::process::id().to_string()), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(matches!(
        attach(&dir, "busy", 7),
        Err(AttachError::Refused { .. })
    ));
    assert!(matches!(
        attach(&dir, "nosuch", 0),
        Err(AttachError::Connect { .. })
    ));
    assert!(matches!(
        attach(&dir, "../x", 0),
        Err(AttachError::RuntimeDir(_))
    ));
}

#[test]
fn a_detached_consumers_unreleased_batches_are_redelivered_in_order() {
    let (_t, dir, p) = setup("redeliver", 1, 4);
    for i in 0..4 {
        publish(&p, 0, i);
    }
    let c = attach(&dir, "redeliver", 0).unwrap();
    drop(c.next().unwrap().unwrap()); // seq 1 released
    let b2 = c.next().unwrap().unwrap();
    let b3 = c.next().unwrap().unwrap();
    // Emulate a consumer that vanishes while holding 2 and 3: forget the guards, close.
    std::mem::forget(b3);
    std::mem::forget(b2);
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    let c2 = loop {
        match attach(&dir, "redeliver", 0) {
            Ok(c) => break c,
            Err(AttachError::Refused { .. }) if Instant::now() < deadline => {
                std::thread::yield_now()
            }
            Err(e) => panic!("{e}"),
        }
    };
    let got: Vec<(u64, bool)> = (0..3)
        .map(|_| {
            let b = c2.next().unwrap().unwrap();
            (b.seq(), b.redelivered())
        })
        .collect();
    assert_eq!(got, vec![(2, true), (3, true), (4, false)]);
}

#[test]
fn resume_discards_ready_batches_after_the_pipeline_applies_the_seek() {
    let (_t, dir, p) = setup("seek", 1, 3);
    publish(&p, 0, 0);
    publish(&p, 0, 1);
    let dir2 = dir.clone();
    let consumer = std::thread::spawn(move || {
        let mut o = AttachOptions::new("seek", 0);
        o.dir = Some(dir2);
        o.resume = Some((0, 7));
        let c = Consumer::attach_with(&o).unwrap();
        let b = c.next().unwrap().unwrap();
        (b.index(), b.seq())
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let seek = loop {
        let mut v = p.take_seek_requests();
        if let Some(s) = v.pop() {
            break s;
        }
        assert!(Instant::now() < deadline, "no seek request arrived");
        // Between batches, as the pipeline would, without busy-spinning.
        let _ = p.claim_any(&[], Duration::from_millis(5));
    };
    assert_eq!((seek.lane, seek.epoch, seek.index), (0, 0, 7));
    seek.apply();
    assert_eq!(p.stats().lanes[0].stream, 1);
    assert_eq!(p.stats().lanes[0].ready, 0, "stale batches discarded");
    publish(&p, 0, 7);
    assert_eq!(consumer.join().unwrap(), (7, 3));
}

#[test]
fn claim_any_times_out_and_counts_the_wait() {
    let (_t, _dir, p) = setup("wait", 1, 1);
    let _w = p.try_claim(0).unwrap();
    assert!(p.claim_any(&[0], Duration::from_millis(30)).is_none());
    let s = p.stats();
    assert!(s.producer_wait_ns >= 20_000_000 && s.lanes[0].producer_wait_ns == s.producer_wait_ns);
}

#[test]
fn an_idle_consumer_does_not_spin() {
    let (_t, dir, _p) = setup("idle", 1, 1);
    let c = attach(&dir, "idle", 0).unwrap();
    let cpu = || rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let (t0, w0) = (cpu(), Instant::now());
    assert!(matches!(
        c.next_timeout(Duration::from_millis(500)),
        Err(ConsumeError::Timeout { .. })
    ));
    let t1 = cpu();
    let used = (t1.tv_sec - t0.tv_sec) as f64 + (t1.tv_nsec - t0.tv_nsec) as f64 / 1e9;
    let wall = w0.elapsed().as_secs_f64();
    assert!(
        used < wall * 0.05,
        "idle wait used {used:.4} s CPU over {wall:.3} s"
    );
}

/// Producer thread and consumer racing through a 2-slot lane for thousands of batches: every
/// batch arrives once, in order, and whole (the producer never wrote into a READY slot before its release,
/// so no payload is torn).
#[test]
fn concurrent_producer_and_consumer_never_tear_a_batch() {
    let (_t, dir, p) = setup("stress", 1, 2);
    let c = attach(&dir, "stress", 0).unwrap();
    const N: u64 = 5_000;
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..N {
                let mut w = p
                    .claim_any(&[0], Duration::from_secs(30))
                    .expect("consumer stalled");
                let mut t = w.tensors_mut();
                t[0].fill(i as u8);
                for chunk in t[1].chunks_exact_mut(8) {
                    chunk.copy_from_slice(&(i as i64).to_le_bytes());
                }
                w.publish(BatchMeta {
                    epoch: 0,
                    index: i,
                    count: 4,
                    last_of_epoch: i + 1 == N,
                });
            }
            p.finish();
        });
        let mut expect = 0;
        while let Some(b) = c.next_timeout(Duration::from_secs(30)).unwrap() {
            assert_eq!((b.seq(), b.index()), (expect + 1, expect));
            assert!(
                b.tensor_bytes(0).iter().all(|&x| x == expect as u8),
                "torn payload at {expect}"
            );
            assert!(b
                .tensor::<i64>("labels")
                .unwrap()
                .iter()
                .all(|&x| x == expect as i64));
            expect += 1;
        }
        assert_eq!(expect, N);
    });
}

#[test]
fn a_ring_without_world_size_is_read_as_an_old_producers_and_not_refused() {
    // `world_size` 0 in the header: what a producer before 1.3 wrote into reserved bytes.
    let (_t, dir, p) = setup("oldws", 2, 2);
    publish(&p, 1, 0);
    let mut o = AttachOptions::new("oldws", 1);
    o.dir = Some(dir.clone());
    o.expect_rank = Some((5, 8)); // cannot be checked: accepted
    let c = Consumer::attach_with(&o).unwrap();
    assert_eq!((c.layout().world_size, c.layout().lane_rank(1)), (0, None));
    assert_eq!(c.fingerprint(), None);
    let b = c.next().unwrap().unwrap();
    // No `valid` tensor either: every row counts.
    assert_eq!((b.valid(), b.valid_count()), (None, 4));
    // A resume state saved here has nothing to be checked against.
    let state = c.resume_state(0, 1);
    assert_eq!((state.sample, state.fingerprint), (None, None));
}

/// A process that forked while holding a batch: the child's copy of the batch, dropped in the
/// child, releases nothing (the parent is still reading); the parent's release does.
#[test]
fn a_forked_childs_drop_releases_nothing() {
    let (_t, dir, p) = setup("forked", 1, 1);
    publish(&p, 0, 0);
    let c = attach(&dir, "forked", 0).unwrap();
    let b = c.next().unwrap().unwrap();
    // SAFETY: the child only drops its copy of the batch (a getpid and a comparison: no
    // allocation, no lock) and exits at once with `_exit`, touching nothing else the other
    // threads of this test process may have held at the fork.
    let child = unsafe { libc::fork() };
    if child == 0 {
        drop(b);
        // SAFETY: ends the child without running destructors or atexit handlers.
        unsafe { libc::_exit(0) };
    }
    assert!(child > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    assert!(
        b.still_held(),
        "the child's drop released the parent's batch"
    );
    assert!(p.try_claim(0).is_none(), "the slot is still held");
    assert_eq!(p.stats().lanes[0].released, 0);
    drop(b);
    assert_eq!(p.stats().lanes[0].released, 1);
    assert!(
        p.try_claim(0).is_some(),
        "the parent's release frees the slot"
    );
}
