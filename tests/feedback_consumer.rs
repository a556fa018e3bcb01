//! The Rust consumer's feedback path against an in-process producer: reports arrive in order
//! and intact, ids outside the dataset are refused naming them, `EPOCH_DONE` goes out by
//! itself when a take follows a last-of-epoch batch, a flood of reports never blocks and loses
//! nothing, a malformed frame costs the sender its lane (not the producer), and a consumer
//! cannot write its lane's epoch plan (format 2.0: the ring is passed read-only).

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ringfeed::ring::feedback::Feedback;
use ringfeed::ring::{
    AttachOptions, BatchMeta, Consumer, DType, Producer, ProducerOptions, ReportError, RingSpec,
    RuntimeDir, TensorSpec,
};

fn setup(name: &str) -> (tempfile::TempDir, RuntimeDir, Producer) {
    setup_with(name, &ProducerOptions::default())
}

fn setup_with(name: &str, options: &ProducerOptions) -> (tempfile::TempDir, RuntimeDir, Producer) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = RuntimeDir::at(tmp.path().join("rt"));
    let spec = RingSpec {
        selection: true,
        batches_per_epoch: 2,
        seed: 1,
        samples_per_epoch: 100,
        ..RingSpec::new(
            name,
            1,
            2,
            2,
            vec![TensorSpec {
                name: "sample_ids".into(),
                dtype: DType::I64,
                shape: vec![2],
            }],
        )
    };
    let p = Producer::create_with(&spec, &dir, options).unwrap();
    (tmp, dir, p)
}

fn attach(dir: &RuntimeDir, name: &str) -> Consumer {
    let mut o = AttachOptions::new(name, 0);
    o.dir = Some(dir.clone());
    Consumer::attach_with(&o).unwrap()
}

/// Takes feedback until `want` frames arrived (or 10 s passed).
fn frames(p: &Producer, want: usize) -> Vec<Feedback> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        got.extend(p.take_feedback().into_iter().map(|(lane, f)| {
            assert_eq!(lane, 0);
            f
        }));
        std::thread::sleep(Duration::from_millis(2));
    }
    got
}

fn publish(p: &Producer, epoch: u64, index: u64, last: bool) {
    let w = p.try_claim(0).expect("free slot");
    w.publish(BatchMeta {
        epoch,
        index,
        count: 2,
        last_of_epoch: last,
    });
}

#[test]
fn reports_and_epoch_ends_reach_the_producer_in_order() {
    let (_t, dir, p) = setup("fb-order");
    let c = attach(&dir, "fb-order");
    publish(&p, 0, 0, false);
    publish(&p, 0, 1, true);
    let b = c.next().unwrap().unwrap();
    drop(b);
    c.report(&[3, 4], &[0.5, f32::NAN]).unwrap();
    let b = c.next().unwrap().unwrap();
    assert!(b.last_of_epoch());
    drop(b);
    c.report(&[5], &[1.5]).unwrap();
    assert_eq!(
        c.report(&[1, 100, 7, 200], &[1.0; 4]),
        Err(ReportError::OutOfRange {
            ids: vec![100, 200],
            n: 100
        })
    );
    assert!(matches!(
        c.report(&[1], &[]),
        Err(ReportError::Length { ids: 1, losses: 0 })
    ));
    publish(&p, 1, 0, false);
    drop(c.next().unwrap().unwrap()); // follows a last-of-epoch batch: EPOCH_DONE 0 first
    let got = frames(&p, 3);
    assert_eq!(got.len(), 3, "{got:?}");
    match &got[0] {
        Feedback::Report { epoch, ids, losses } => {
            assert_eq!((*epoch, ids.as_slice()), (0, &[3, 4][..]));
            assert_eq!(losses[0], 0.5);
            assert!(losses[1].is_nan(), "bad values are the producer's to count");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&got[1], Feedback::Report { epoch: 0, ids, .. } if ids == &[5]));
    assert_eq!(got[2], Feedback::EpochDone { epoch: 0 });
}

#[test]
fn a_flood_of_reports_never_blocks_and_loses_nothing() {
    let (_t, dir, p) = setup("fb-flood");
    let c = attach(&dir, "fb-flood");
    let ids: Vec<u64> = (0..64).collect();
    let losses = vec![1.0f32; 64];
    // ~8 MB: far more than a socket buffer holds while nobody drains the producer's queue.
    let started = Instant::now();
    for _ in 0..10_000 {
        c.report(&ids, &losses).unwrap();
    }
    let elapsed = started.elapsed();
    drop(c); // flushes what the socket had not taken yet
    let got = frames(&p, 10_000);
    assert_eq!(got.len(), 10_000, "sent in {elapsed:?}");
    assert!(got
        .iter()
        .all(|f| matches!(f, Feedback::Report { ids, .. } if ids.len() == 64)));
}

#[test]
fn a_malformed_frame_drops_only_that_connection() {
    let (_t, dir, p) = setup("fb-bad");
    // A raw client attaches like a consumer, then sends bytes that are no frame.
    let mut raw = UnixStream::connect(dir.socket_path("fb-bad")).unwrap();
    raw.write_all(b"{\"op\":\"attach\",\"version\":2,\"lane\":0,\"pid\":1}\n")
        .unwrap();
    let mut reply = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.stats().lanes[0].consumer_pid == 0 {
        assert!(Instant::now() < deadline, "attach did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = std::io::Read::read(&mut raw, &mut reply);
    raw.write_all(b"GARBAGE GARBAGE GARBAGE!").unwrap();
    while p.stats().lanes[0].consumer_pid != 0 {
        assert!(
            Instant::now() < deadline,
            "the lane was not reclaimed after a malformed frame"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The producer still serves: a well-behaved consumer attaches and reports.
    let c = attach(&dir, "fb-bad");
    c.report(&[1], &[2.0]).unwrap();
    assert!(matches!(
        frames(&p, 1).as_slice(),
        [Feedback::Report { epoch: 0, .. }]
    ));
}

/// 1.3 let a consumer forge its lane's epoch plan (the producer restored it a heartbeat
/// later); in 2.0 the consumer cannot write it at all: the ring descriptor an attach passes is
/// read-only, so `pwrite` fails and so does a writable shared mapping, and the plan stays the
/// producer's. (That a store into the read-only mapping faults is tested against the daemon
/// in tests/security_consumer.rs.)
#[test]
fn a_consumer_cannot_write_the_epoch_plan() {
    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let (_t, dir, p) = setup("fb-plan");
    p.announce_epoch(0, 3, 7, 56, 40);
    let mut raw = UnixStream::connect(dir.socket_path("fb-plan")).unwrap();
    raw.write_all(b"{\"op\":\"attach\",\"version\":2,\"lane\":0,\"pid\":1}\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(
        &raw,
        &mut [std::io::IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .unwrap();
    let ring = control
        .drain()
        .find_map(|m| match m {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })
        .map(std::fs::File::from)
        .expect("the ring's descriptor");
    let mut word = [0u8; 4];
    ring.read_exact_at(&mut word, 96).unwrap(); // lane_table_offset
    let plan_at = u64::from(u32::from_le_bytes(word)) + 72;
    let read_plan = || {
        let mut b = [0u8; 32];
        ring.read_exact_at(&mut b, plan_at).unwrap();
        let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        [w(0), w(1), w(2), w(3)]
    };
    assert_eq!(read_plan(), [4, 7, 56, 40]);
    let forged: Vec<u8> = [9u64, 1, 1, 0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert!(ring.write_all_at(&forged, plan_at).is_err(), "pwrite");
    let file_len = ring.metadata().unwrap().len() as usize;
    // SAFETY: asks the kernel for a new shared writable mapping, which it refuses; nothing
    // is dereferenced.
    let writable = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            file_len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &ring,
            0,
        )
    };
    assert_eq!(writable.err(), Some(rustix::io::Errno::ACCESS));
    assert_eq!(read_plan(), [4, 7, 56, 40]);
}
