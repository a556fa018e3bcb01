//! The Rust consumer: attaches to one lane, validates the ring before making any view, and
//! hands out batches that are read in place and released when dropped.
//!
//! # Brief overview
//!
//! The rooms mirror the Python client's (`clients/python/src/ringfeed/`):
//!
//! - `attach` (Python `protocol.attach` + `Ring.from_fd`): [`AttachOptions`], the handshake,
//!   the checks of the reply and its three descriptors (the ring must be read-only),
//!   validation, then the mappings: the ring read-only, the lane page read-write;
//! - this file (Python `loader.py`): [`Consumer`], waiting for batches with liveness checks,
//!   epochs and passes, loss reports;
//! - `lane` (Python `ring.py`): the consumer's half of the slot protocol on its lane: take the
//!   oldest `READY` slot not yet taken, release it — both written into the lane page only
//!   (format 2.0: a consumer writes nothing in the ring);
//! - `batch` (Python `batch.py`): [`Batch`], a held slot's tensors viewed in place;
//! - `error` (Python `errors.py`): [`AttachError`], [`ConsumeError`], [`ReportError`],
//!   [`TensorError`].

mod attach;
mod batch;
mod error;
mod lane;

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::time::{Duration, Instant};

use super::feedback;
use super::futex::{self, mono_ns};
use super::layout::{decode_last_error, hdr, lane as lentry, read_state, Layout, ProducerState};
use super::memory::{Control, Data};
use super::page::LanePage;
use super::protocol;
use super::resume::{Fingerprint, ResumeState};

pub use attach::AttachOptions;
pub use batch::Batch;
pub use error::{AttachError, ConsumeError, ReportError, TensorError};

/// Longest single futex wait: the socket and producer state are re-checked at least this
/// often, which bounds how long a producer's death goes unnoticed.
const MAX_WAIT: Duration = Duration::from_millis(100);
/// A heartbeat older than this means the producer is frozen.
const HEARTBEAT_STALE_NS: u64 = 3_000_000_000;

/// A consumer attached to one lane. Not `Sync`: one thread takes batches (it may hold
/// several at once).
pub struct Consumer {
    name: String,
    lane: u32,
    /// The process that attached: only it releases (a forked child's drop of a batch is a
    /// no-op).
    pid: u32,
    producer_pid: u32,
    layout: Layout,
    /// The control region, mapped read-only.
    control: Control,
    /// The data region, mapped read-only.
    data: Data,
    /// This attach's lane page, mapped read-write: the only memory this consumer writes.
    page: LanePage,
    /// The doorbell: written after every release to wake a producer waiting for a slot.
    doorbell: std::os::fd::OwnedFd,
    stream: UnixStream,
    /// Feedback frames (§9) not yet accepted by the socket (the producer was busy).
    outbox: RefCell<Vec<u8>>,
    /// Epoch and last-of-epoch flag of the last batch taken.
    last_taken: Cell<Option<(u64, bool)>>,
    /// The last epoch an `EPOCH_DONE` frame was queued for.
    epoch_done_sent: Cell<Option<u64>>,
    /// On an on-demand ring: the number of the last pass asked for, and the index of the
    /// next batch of the pass under way (`None` between passes).
    pass: Cell<(u64, Option<u64>)>,
    /// The producer's fingerprint from the attach reply (1.3).
    fingerprint: Option<Fingerprint>,
    /// Where a checked resume started, and the producer's warnings about it.
    resumed_at: Option<(u64, u64)>,
    resume_warnings: Vec<String>,
    _not_sync: PhantomData<Cell<()>>,
}

impl Drop for Consumer {
    /// Sends what the outbox still holds (waiting up to 10 s for a busy producer, not at all
    /// for a dead one), so reports made just before detaching are not lost.
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.outbox.get_mut().is_empty() && Instant::now() < deadline {
            if !self.flush_outbox() {
                break;
            }
            if !self.outbox.get_mut().is_empty() {
                let _ = rustix::event::poll(
                    &mut [rustix::event::PollFd::new(
                        &self.stream,
                        rustix::event::PollFlags::OUT,
                    )],
                    Some(&rustix::time::Timespec {
                        tv_sec: 0,
                        tv_nsec: 10_000_000,
                    }),
                );
            }
        }
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.name)
            .field("lane", &self.lane)
            .field("generation", &self.layout.generation)
            .finish()
    }
}

impl Consumer {
    /// Reports per-sample losses to the producer (§9): `ids` as in the `sample_ids` tensor,
    /// one loss per id, attributed to the epoch of the last batch taken. Never blocks: what
    /// the socket does not accept now is kept and sent at the next call (or on drop). Ids at
    /// or past the dataset size are refused, naming them; NaN, infinite and negative losses
    /// are sent and counted (then ignored) by the producer.
    pub fn report(&self, ids: &[u64], losses: &[f32]) -> Result<(), ReportError> {
        if ids.len() != losses.len() {
            return Err(ReportError::Length {
                ids: ids.len(),
                losses: losses.len(),
            });
        }
        let n = self.layout.samples_per_epoch;
        let bad: Vec<u64> = ids.iter().copied().filter(|&id| id >= n).collect();
        if !bad.is_empty() {
            return Err(ReportError::OutOfRange { ids: bad, n });
        }
        let epoch = self.last_taken.get().map_or(0, |(e, _)| e);
        {
            let mut outbox = self.outbox.borrow_mut();
            let step = feedback::MAX_REPORT_SAMPLES as usize;
            for (i, l) in ids.chunks(step).zip(losses.chunks(step)) {
                feedback::encode_report(&mut outbox, epoch, i, l);
            }
        }
        let _ = self.flush_outbox();
        Ok(())
    }

    /// Tells the producer that every report of `epoch` has been sent. [`next`](Self::next)
    /// does this by itself when the batch it takes follows a last-of-epoch batch; call it
    /// earlier to let a selecting producer (`[selection]`) decide the next epoch sooner.
    pub fn end_epoch(&self, epoch: u64) {
        if self.epoch_done_sent.get().is_some_and(|e| e >= epoch) {
            return;
        }
        self.epoch_done_sent.set(Some(epoch));
        feedback::encode_epoch_done(&mut self.outbox.borrow_mut(), epoch);
        let _ = self.flush_outbox();
    }

    /// Sends as much of the outbox as the socket takes without blocking. `false` when the
    /// connection is broken (the producer is gone, which `next` reports).
    fn flush_outbox(&self) -> bool {
        let mut outbox = self.outbox.borrow_mut();
        while !outbox.is_empty() {
            match rustix::net::send(
                &self.stream,
                &outbox,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(n) => {
                    outbox.drain(..n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return true, // the producer is busy
                Err(_) => return false,
            }
        }
        true
    }

    /// On an on-demand ring (header flag bit 3): asks the producer for one complete pass
    /// over this lane's share of the data, from its first batch, in the same order as every
    /// other pass (a `PASS` frame, §9). [`next`](Self::next) then returns the pass's batches
    /// and `Ok(None)` after its last one; batches of an earlier pass still in the ring are
    /// given back unread. Asking again during a pass abandons it. Returns the pass's number
    /// (the `epoch` of its batches). On another ring it does nothing and returns 0.
    pub fn start_pass(&self) -> u64 {
        if !self.layout.on_demand() {
            return 0;
        }
        let published = self.lane_u64(lentry::EPOCH).load(Acquire);
        let pass = self.pass.get().0.max(published) + 1;
        self.pass.set((pass, Some(0)));
        feedback::encode_pass(&mut self.outbox.borrow_mut(), pass, 0);
        let _ = self.flush_outbox();
        pass
    }

    /// The producer's fingerprint (1.3): what defines its epoch order and batches; `None`
    /// from an older producer.
    pub fn fingerprint(&self) -> Option<&Fingerprint> {
        self.fingerprint.as_ref()
    }

    /// The state to save so that a later attach resumes at batch `(epoch, index)` of this
    /// lane (the next batch wanted), checked against the producer's configuration then.
    pub fn resume_state(&self, epoch: u64, index: u64) -> ResumeState {
        ResumeState::at(epoch, index, self.fingerprint.as_ref())
    }

    /// `(epoch, index)` where a resume with a fingerprint started (the batch holding the
    /// saved sample when the batch size changed); `None` without one.
    pub fn resumed_at(&self) -> Option<(u64, u64)> {
        self.resumed_at
    }

    /// What the producer said about this attach's resume (a remapped batch size, a changed
    /// augmentation); empty when nothing differed.
    pub fn resume_warnings(&self) -> &[String] {
        &self.resume_warnings
    }

    /// The ring's validated layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The producer generation this consumer attached to.
    pub fn generation(&self) -> u64 {
        self.layout.generation
    }

    /// The attached lane.
    pub fn lane(&self) -> u32 {
        self.lane
    }

    /// Addresses of the read-only data mapping (every batch view lies inside it).
    pub fn data_address_range(&self) -> std::ops::Range<usize> {
        self.data.address_range()
    }

    /// The next batch of the lane in `seq` order, blocking until one is ready. `Ok(None)`: the
    /// stream has ended (producer `FINISHED`, nothing left), or, on an on-demand ring, the
    /// pass asked for with [`start_pass`](Self::start_pass) is complete (or none was asked
    /// for). A dead producer is reported as [`ConsumeError::ProducerGone`] within about
    /// 100 ms.
    pub fn next(&self) -> Result<Option<Batch<'_>>, ConsumeError> {
        self.next_until(None)
    }

    /// Like [`next`](Self::next), giving up with [`ConsumeError::Timeout`] after `t`.
    pub fn next_timeout(&self, t: Duration) -> Result<Option<Batch<'_>>, ConsumeError> {
        self.next_until(Some((Instant::now() + t, t)))
    }

    fn lane_u32(&self, off: u64) -> &std::sync::atomic::AtomicU32 {
        self.control.u32(self.layout.lane_entry(self.lane) + off)
    }
    fn lane_u64(&self, off: u64) -> &std::sync::atomic::AtomicU64 {
        self.control.u64(self.layout.lane_entry(self.lane) + off)
    }
    fn touch_heartbeat(&self) {
        self.page.heartbeat_mono_ns().store(mono_ns(), Relaxed);
    }

    fn gone(&self, reason: String) -> ConsumeError {
        ConsumeError::ProducerGone {
            name: self.name.clone(),
            pid: self.producer_pid,
            reason,
        }
    }

    fn next_until(
        &self,
        deadline: Option<(Instant, Duration)>,
    ) -> Result<Option<Batch<'_>>, ConsumeError> {
        if let Some((epoch, true)) = self.last_taken.get() {
            self.end_epoch(epoch);
        }
        let _ = self.flush_outbox();
        if self.layout.on_demand() && self.pass.get().1.is_none() {
            return Ok(None);
        }
        let publish_seq = self.lane_u32(lentry::PUBLISH_SEQ);
        let mut wait_started: Option<Instant> = None;
        let result = loop {
            // Read the word before scanning, so a publish after the scan changes it and the
            // futex wait returns at once (partner: the bump in SlotWriter::publish).
            let v = publish_seq.load(Acquire);
            if let Some(b) = self.try_take()? {
                break Ok(Some(b));
            }
            match read_state(&self.control) {
                Some(ProducerState::Finished) => {
                    // Publishes happen-before FINISHED: one more scan sees them all.
                    break self.try_take();
                }
                Some(ProducerState::Stopped) => break Err(self.gone("it stopped".into())),
                Some(ProducerState::Failed) => {
                    break Err(self.gone(format!("it failed: {}", decode_last_error(&self.control))))
                }
                _ => {}
            }
            if protocol::peer_closed(&self.stream) {
                break Err(self.gone("its socket closed (process exited or was killed)".into()));
            }
            let beat = self
                .control
                .u64(hdr::HEARTBEAT_MONO_NS as u64)
                .load(Acquire);
            if mono_ns().saturating_sub(beat) > HEARTBEAT_STALE_NS {
                break Err(self.gone("its heartbeat is older than 3 s (frozen)".into()));
            }
            let mut wait = MAX_WAIT;
            if let Some((until, t)) = deadline {
                let now = Instant::now();
                if now >= until {
                    break Err(ConsumeError::Timeout {
                        name: self.name.clone(),
                        lane: self.lane,
                        waited: t,
                    });
                }
                wait = wait.min(until - now);
            }
            wait_started.get_or_insert_with(Instant::now);
            futex::wait(publish_seq, v, wait);
        };
        if let Some(t) = wait_started {
            self.page
                .consumer_wait_ns()
                .fetch_add(t.elapsed().as_nanos() as u64, Relaxed);
        }
        self.touch_heartbeat();
        result
    }
}
