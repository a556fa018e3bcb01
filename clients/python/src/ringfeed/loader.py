"""The trainer-facing iterator: attach to a lane, wait for batches, track epochs and resume.

Brief overview: a :class:`Loader` attaches with :mod:`ringfeed.protocol`, maps the ring with
:class:`ringfeed.ring.Ring`, and turns the slot protocol into Python iteration: one ``for`` is
one epoch, waiting is a futex sleep of at most 100 ms between liveness checks, and
:meth:`Loader.state_dict` is the cursor a restarted trainer passes back as ``resume``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import warnings
import weakref
from types import TracebackType
from typing import Any, Optional, Union

import numpy as np

from . import _frameworks, _signals, feedback, protocol
from .batch import Batch
from .device import PendingReleases, current_stream_fence
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    AttachArgumentError,
    AttachError,
    DaemonNotRunning,
    FormatError,
    ProducerGone,
    RankMismatch,
    ResumeMismatch,
    RingfeedError,
    RingfeedWarning,
    RingTimeout,
    StreamFinished,
)
from .layout import (
    FAILED,
    FINISHED,
    PRODUCER_STATES,
    SLOT_LAST_OF_EPOCH,
    STOPPED,
    RingLayout,
)
from .ring import Ring
from .runtime import check_name, running_rings, runtime_dir, socket_path
from .stats import LoaderStats

PathLike = Union[str, "os.PathLike[str]"]

WAIT_SLICE_S = 0.1  # §6: futex timeout ≤ 100 ms, then liveness is re-checked
HEARTBEAT_STALE_NS = 3_000_000_000  # §6: a heartbeat older than 3 s means a frozen producer
REATTACH_PATIENCE_S = 2.0  # our own EOF may reach the producer after our new attach request
START_PATIENCE_S = 30.0  # default wait for a daemon that is not listening yet (started alongside)
_RETRY_PAUSE_S = 0.05

_log = logging.getLogger("ringfeed")


class _EndOfStream(Exception):
    pass


# _try_take's answer when it took a stale batch of an earlier pass (and gave it back at once).
_STALE = object()


def evaluation(
    name: str, *, runtime_dir: Optional[PathLike] = None, trust_uid: Optional[int] = None
) -> dict[str, Any]:
    """The daemon ``name``'s evaluation of reported losses, without attaching: ``reports``
    counters, ``scores``, ``selection`` and, per recent epoch, the mean loss by augmentation
    bucket (``loss_by``) and by class (``loss_by_class``). See docs/feedback.md."""
    path = socket_path(check_name(name), runtime_dir, trust_uid=trust_uid)
    return protocol.evaluation(path, trust_uid=trust_uid)


# Every loader of this process, so that a fork()ed child can make its copies inert at once.
_LOADERS: weakref.WeakSet[Loader] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for loader in list(_LOADERS):
        loader._disown(f"inherited through fork() from pid {loader._pid}")


os.register_at_fork(after_in_child=_after_fork_in_child)


def _env_int(key: str, explicit: Optional[int]) -> Optional[int]:
    """``explicit`` if given, else the environment variable ``key`` as an int (``None`` when
    unset or empty); a value that is not an integer is an error naming it."""
    if explicit is not None:
        return int(explicit)
    raw = os.environ.get(key, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ArgumentError(f"environment variable {key}={raw!r} is not an integer") from None


class Loader:
    """Iterate over the batches of one lane of a ringfeed producer.

    ``for batch in loader`` yields the batches of one epoch and stops after the slot flagged
    last-of-epoch; the next ``for`` continues with the next epoch (a ``break`` leaves the
    cursor where it stopped). After the producer's last epoch, iteration raises
    :class:`StreamFinished` (a ``StopIteration``, so a ``for`` ends; the reason is logged
    once) and ``len(loader)`` is 0.

    On an **on-demand** ring (``[sampling] on-demand = true``, the validation presets) every
    ``for batch in loader`` is one complete pass from the first batch, in the same order each
    time: the loop asks the daemon for the pass, which produces it for this lane only then.
    A ``break`` abandons the pass; the next ``for`` starts a new one from the first batch.

    Args:
        name: ring name (the daemon's ``--name``).
        lane: lane to attach to; default ``$LOCAL_RANK``, else 0.
        release_previous: release the previous batch when the next one is requested.
        max_held: at most this many batches held at once (:class:`RingfeedError` beyond);
            holding every slot of the lane is always refused because it would deadlock.
        pin: ``cudaHostRegister`` the data mapping once (warns and carries on without CUDA).
        from_epoch_start: start at the first batch of the epoch the lane is in, rather than
            wherever the daemon has got to (see :meth:`restart_epoch`). On-demand rings
            always start a pass at its first batch.
        resume: a saved :meth:`state_dict` (or ``{"epoch", "index"}``): the producer seeks
            the lane to it. A state with a ``fingerprint`` is checked by the producer: a
            daemon whose sample order differs (seed, dataset, shuffle, …) refuses it with
            :class:`ResumeMismatch` naming the fields; one whose world size or batch size
            differs (elastic resume) starts at the batch holding the saved ``sample``
            position, with a warning: with the same global batch size (world size × batch
            size) that is exactly where the job stopped, and the rest of the epoch is served
            once across the new ranks. A
            state without one (saved before 1.3) resumes at its batch index, with a
            :class:`RingfeedWarning`.
        wait_for_producer: seconds to keep retrying connect/attach while the error is
            retryable (:attr:`AttachError.retryable`: no producer yet, lane still held), also
            used to re-attach (resuming at the cursor) when the producer dies mid-run; a
            producer that finished the run and exited ends the iteration instead.
            Default ``None``: wait up to 30 s for a daemon that is not listening yet (one
            started at the same moment), refuse at once otherwise, and raise
            :class:`ProducerGone` if it dies.
        rank, world_size: the global rank and world size this trainer is; default
            ``$RANK`` / ``$WORLD_SIZE`` (torchrun). The attach is refused
            (:class:`RankMismatch`, saying how to start the daemon) unless the lane serves
            exactly that rank of that world size. Producers before 1.3 do not say; then a
            :class:`RingfeedWarning` says it could not be checked.
        timeout: raise :class:`RingTimeout` when no batch arrives within this many seconds.
        runtime_dir: override the runtime directory (§2).
        trust_uid: also accept a producer running as this uid (a daemon started with
            ``--allow-group`` for a group this user belongs to); its runtime directory must
            then be owned by that uid and may grant its group read/search (0750).

    Threads: a Loader may be shared by threads. Taking and releasing a slot happen under a
    lock, so each batch goes to exactly one thread; epoch boundaries (``StopIteration``) are
    seen by whichever thread takes the last batch of an epoch.

    ``fork()``: a child process inherits the parent's Loader and batches inert: they raise
    :class:`RingfeedError` (batches :class:`ReleasedBatchError`) if used, never release the
    parent's slots, and the child's copy of the connection is closed. Attach a new Loader in
    the child (for another lane, or after the parent closed this one).

    Signals: a Python signal handler that raises (``KeyboardInterrupt``) during a take or a
    release runs once the slot change and its bookkeeping are complete; an interrupted take
    gives its batch back to the ring, to be delivered next.
    """

    def __init__(
        self,
        name: str,
        lane: Optional[int] = None,
        *,
        release_previous: bool = True,
        max_held: Optional[int] = None,
        pin: bool = False,
        resume: Optional[dict[str, Any]] = None,
        from_epoch_start: bool = False,
        wait_for_producer: Optional[float] = None,
        timeout: Optional[float] = None,
        runtime_dir: Optional[PathLike] = None,
        trust_uid: Optional[int] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> None:
        """Attach to ``lane`` of the producer called ``name`` (see the class docs)."""
        self.name = check_name(name)
        if lane is None:
            lane = _env_int("LOCAL_RANK", None) or 0
        if lane < 0:
            raise AttachArgumentError(f"lane must be >= 0, got {lane}")
        if max_held is not None and max_held < 1:
            raise ArgumentError(f"max_held must be >= 1, got {max_held}")
        self.lane = lane
        self._release_previous = release_previous
        self._max_held = max_held
        self._pin = pin
        self._wait_for_producer = 0.0 if wait_for_producer is None else float(wait_for_producer)
        self._start_patience = (
            START_PATIENCE_S if wait_for_producer is None else self._wait_for_producer
        )
        self._expect = (_env_int("RANK", rank), _env_int("WORLD_SIZE", world_size))
        self._fingerprint: Optional[dict[str, Any]] = None  # the producer's (attach reply)
        self._timeout = timeout
        self._runtime_dir = runtime_dir
        self._trust_uid = trust_uid
        self._pid = os.getpid()
        self._disowned: Optional[str] = None  # why this copy is inert (fork), or None
        self._lock = threading.Lock()  # take, release and their bookkeeping
        self._taking: Optional[tuple[int, int]] = None  # (slot, seq) of a take under way
        self._sock: Optional[socket.socket] = None
        self._ring: Optional[Ring] = None
        self._pinned_address: Optional[int] = None
        self._held: dict[int, Batch] = {}  # by slot
        self._pending = PendingReleases()  # released by the trainer, device copies in flight
        self._deferred: set[int] = set()  # their slots (still held by us in the lane page)
        self._previous: Optional[Batch] = None
        self._epoch_ended = False
        self._finished = False
        self._cursor: Optional[tuple[int, int]] = None
        self._outbox = feedback.Outbox()  # feedback frames the socket has not taken yet (§9)
        self._last_taken: Optional[tuple[int, bool]] = None  # (epoch, last of its epoch)
        self._epoch_done_sent = -1
        self._pass = 0  # on-demand: the number of the pass asked for last (0: none yet)
        self._pass_next: Optional[int] = None  # on-demand: next index of the pass under way
        self._finish_logged = False
        self._taken = 0
        self._stats_start_ns = 0
        self.generation = 0
        _LOADERS.add(self)
        self._attach(
            self._resume_arg(resume, public=True),
            self._start_patience,
            absent_only=wait_for_producer is None,
        )
        if from_epoch_start and resume is None and not self.layout.on_demand:
            self.restart_epoch()

    # ----- attaching --------------------------------------------------------------------------

    @staticmethod
    def _resume_arg(
        resume: Optional[dict[str, Any]], *, public: bool = False
    ) -> Optional[dict[str, Any]]:
        """The checked ``resume`` of an attach request. A state is data from anywhere (a
        checkpoint file): every field is type-checked here, the fingerprint by the producer.
        ``public``: a state the user passed, warned about when it has no fingerprint."""
        if resume is None:
            return None
        if not isinstance(resume, dict):
            raise ArgumentTypeError(f"resume must be a dict from state_dict(), got {resume!r:.200}")

        def whole(key: str) -> Optional[int]:
            value = resume.get(key)
            if value is None and key == "sample":
                return None
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ArgumentTypeError(
                    f"resume needs integer {key!r} (a dict from state_dict()), got {resume!r:.200}"
                )
            if not 0 <= int(value) < 2**64:
                raise ArgumentError(f"resume {key!r} must be in 0..2**64-1, got {value!r}")
            return int(value)

        checked: dict[str, Any] = {"epoch": whole("epoch"), "index": whole("index")}
        sample = whole("sample")
        fingerprint = resume.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, dict):
            raise ArgumentTypeError(
                "resume 'fingerprint' must be the dict state_dict() saved,"
                f" got {fingerprint!r:.200}"
            )
        if fingerprint is not None:
            try:
                json.dumps(fingerprint, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise ArgumentError(f"resume 'fingerprint' is not JSON data: {err}") from None
            checked["fingerprint"] = fingerprint
            if sample is not None:
                checked["sample"] = sample
        elif public:
            warnings.warn(
                f"resume state {resume!r:.120} has no fingerprint (saved by a ringfeed client"
                " before 1.3, or written by hand): the daemon cannot check that it serves the"
                " same sample order, and a changed batch size would resume at another sample;"
                " save a new state with loader.state_dict()",
                RingfeedWarning,
                stacklevel=3,
            )
        return checked

    def _attach(
        self, resume: Optional[dict[str, Any]], patience_s: float, *, absent_only: bool = False
    ) -> None:
        """Attach (retrying for ``patience_s``: every failure, or with ``absent_only`` only a
        daemon that is not listening yet), map the ring and check it."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                path = socket_path(self.name, self._runtime_dir, trust_uid=self._trust_uid)
                sock, reply, fds = protocol.attach(
                    path, self.lane, resume, trust_uid=self._trust_uid
                )
                break
            except ResumeMismatch:
                raise  # the state itself is wrong: no retry can help
            except AttachError as err:
                if err.code == "not_running":
                    finished = protocol.finished_generation(
                        runtime_dir(self._runtime_dir, self._trust_uid), self.name
                    )
                    # The run this loader was reading has ended: say so at once. A marker of
                    # some earlier run counts only once the wait is over (a new run of the
                    # name may be starting, and its producer removes the marker).
                    if finished is not None and (
                        finished == self.generation != 0 or time.monotonic() >= deadline
                    ):
                        raise AttachError(
                            f"ring {self.name!r}: the run has finished (generation {finished});"
                            " its producer exited after the last epoch",
                            code="finished",
                        ) from None
                if not err.retryable or (absent_only and not isinstance(err, DaemonNotRunning)):
                    raise
                if time.monotonic() >= deadline:
                    raise self._not_running(err, patience_s) from None
                time.sleep(_RETRY_PAUSE_S)
        try:
            try:
                if reply.get("lane") != self.lane:
                    raise FormatError("lane", f"attached lane {reply.get('lane')!r} != {self.lane}")
                # A --shm-dir ring file cannot carry seals (only memfds can); the reply says so.
                ring = Ring.attach(
                    fds.ring,
                    fds.lane,
                    fds.doorbell,
                    lane=self.lane,
                    lane_page_bytes=reply.get("lane_page_bytes"),
                    generation=protocol.reply_generation(reply),
                    sealed=reply.get("segment", "memfd") != "file",
                )
            finally:
                fds.close()
            layout = ring.layout
            if reply.get("file_bytes") != layout.file_bytes:
                raise FormatError("file_bytes", f"attach reply said {reply.get('file_bytes')!r}")
            self._check_rank(ring)
        except BaseException:
            sock.close()
            raise
        # Each attach has its own Ring and lane page: a batch of an earlier attach releases
        # into that attach's page, which the producer no longer reads.
        self._sock, self._ring = sock, ring
        self.generation = layout.generation
        fingerprint = reply.get("fingerprint")
        self._fingerprint = fingerprint if isinstance(fingerprint, dict) else None
        self._finished = False
        if resume is not None:
            self._cursor = (resume["epoch"], resume["index"])
            resumed_at = reply.get("resumed_at")
            if isinstance(resumed_at, dict) and isinstance(resumed_at.get("index"), int):
                self._cursor = (resume["epoch"], resumed_at["index"])
        for warning in reply.get("warnings") or ():
            warnings.warn(f"ring {self.name!r}: {warning}", RingfeedWarning, stacklevel=4)
        self._stats_start_ns = time.monotonic_ns()
        ring.note_consumer(self.lane)
        if self._pin and _frameworks.cuda_pin(ring.data_address, ring.data_bytes):
            self._pinned_address = ring.data_address

    def _not_running(self, err: AttachError, patience_s: float) -> AttachError:
        """``err`` after the attach patience ran out; when no daemon of this name is running,
        saying which rings are and how to start one."""
        if not isinstance(err, DaemonNotRunning):
            return err
        running = running_rings(self._runtime_dir)
        if self.name in running:
            return err
        where = runtime_dir(self._runtime_dir)
        rings = ", ".join(repr(r) for r in running) if running else "none"
        waited = f" after waiting {patience_s:g} s" if patience_s > 0 else ""
        return DaemonNotRunning(
            f"{err}{waited}. No daemon serves ring {self.name!r} in {where} (rings running"
            f" there: {rings}). Start one with `ringfeed serve --name {self.name}` (or"
            f" ringfeed.serve(name={self.name!r}) from the training script), or pass"
            " runtime_dir= / set RINGFEED_RUNTIME_DIR to the daemon's runtime directory"
        )

    def _check_rank(self, ring: Ring) -> None:
        """Refuse a lane that serves another global rank or world size than this trainer."""
        rank, world = self._expect
        if rank is None and world is None:
            return
        served_rank, served_world = ring.lane_rank(self.lane), ring.layout.world_size
        if served_rank is None:
            warnings.warn(
                f"ring {self.name!r} was made by a producer before format 1.3, which does not"
                f" say which rank lane {self.lane} serves: RANK={rank} WORLD_SIZE={world}"
                " cannot be checked",
                RingfeedWarning,
                stacklevel=4,
            )
            return
        wrong = []
        if world is not None and world != served_world:
            wrong.append(f"world size {world} here, {served_world} in the daemon")
        if rank is not None and rank != served_rank:
            wrong.append(f"rank {rank} here, lane {self.lane} serves rank {served_rank}")
        if not wrong:
            return
        world = served_world if world is None else world
        first = max(0, (served_rank if rank is None else rank) - self.lane)
        raise RankMismatch(
            f"ring {self.name!r} does not serve this trainer ({'; '.join(wrong)}; from RANK /"
            f" LOCAL_RANK / WORLD_SIZE or rank= / world_size=): every rank would not get its"
            f" own share of each epoch. Start the daemon with `--world-size {world}"
            f" --first-rank {first}` (the global rank of this node's lane 0, with one lane"
            " per local rank), or call ringfeed.serve() under torchrun, which reads them from"
            " the environment"
        )

    def _detach(self, *, release_held: bool) -> None:
        """Leave the lane. ``release_held`` frees held slots first (producer alive); otherwise
        held batches become unusable (their slots may be reclaimed and refilled by the
        producer, even the same one, which declared this connection dead): reading one raises
        :class:`ReleasedBatchError`, releasing one does nothing."""
        held = _signals.hold()
        try:
            with self._lock:
                ring = self._ring
                for batch in list(self._held.values()):
                    if release_held and ring is not None:
                        self._release_locked(ring, batch)
                    else:
                        batch._mark_released(
                            "its connection to the producer ended before it was released;"
                            " the slot may hold another batch now"
                        )
                if release_held:
                    self._pending.drain()  # a closing trainer waits for its last device copies
                    self._outbox.drain(self._sock)  # reports made just before closing count
                else:
                    self._pending.forget()  # the producer is gone: nothing to hand back
                self._outbox.clear()
                self._deferred.clear()
                self._held.clear()
                self._taking = None
                self._previous = None
                if ring is not None:
                    ring.close_lane()  # its doorbell; releases of old batches reach nobody
        finally:
            _signals.resume(held)
        if self._pinned_address is not None:
            _frameworks.cuda_unpin(self._pinned_address)
            self._pinned_address = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ring = None

    def _disown(self, why: str) -> None:
        """Make this copy inert (a fork()ed child's): no release, no heartbeat, and the
        child's copy of the connection closed, so that the parent's own close is seen."""
        self._disowned = why
        self._lock = threading.Lock()  # another thread may have held the parent's at fork
        for batch in self._held.values():
            batch._mark_released(why)
        self._held.clear()
        self._pending = PendingReleases()  # the parent's device copies: not ours to wait for
        self._outbox = feedback.Outbox()  # the parent's unsent reports: not ours to send
        self._deferred = set()
        self._taking = None
        self._previous = None
        self._pinned_address = None  # the parent's registration, not ours to undo
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ring = None

    def _inherited(self) -> bool:
        """Whether this is a fork()ed copy; detects a fork that bypassed os.fork (a C
        library's) by the pid, and disowns the copy then."""
        if self._disowned is None and os.getpid() != self._pid:
            self._disown(f"inherited through fork() from pid {self._pid}")
        return self._disowned is not None

    def close(self) -> None:
        """Release every held batch and detach. Idempotent; the loader is unusable after.
        In a fork()ed child it releases nothing (the batches are the parent's)."""
        if self._inherited():
            return
        if self._sock is not None:
            self._detach(release_held=True)

    def __del__(self) -> None:
        # Batches refer to their loader weakly: this runs as soon as the loader is dropped.
        if getattr(self, "_sock", None) is not None:
            self.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def _refuse_if_inherited(self) -> None:
        if self._inherited():
            raise RingfeedError(
                f"this Loader is {self._disowned} and inert in pid {os.getpid()}:"
                " create a new Loader in this process"
            )

    def _live_ring(self) -> Ring:
        self._refuse_if_inherited()
        if self._ring is None:
            raise RingfeedError("the loader is closed")
        return self._ring

    @property
    def layout(self) -> RingLayout:
        """The ring's validated header: schema, batch size, lanes, epochs…"""
        return self._live_ring().layout

    @property
    def ring(self) -> Ring:
        """The mapped ring (low-level access)."""
        return self._live_ring()

    def __len__(self) -> int:
        """Batches of the next epoch in this lane (of a pass, on an on-demand ring);
        TypeError when the producer does not know. 0 once iteration has met the end of the
        stream (:class:`StreamFinished`), and for a loader that has taken nothing from a
        finished ring whose lane has nothing left.

        With selection (``[selection]`` on the daemon) this is the epoch's real length, which
        the producer decides at the epoch's start: the call may wait for that decision.
        """
        layout = self.layout
        if layout.on_demand:
            return layout.batches_per_epoch  # every pass is whole
        if self._finished or self._nothing_left_for_fresh_loader(layout):
            return 0  # the producer has served its last epoch: a `for` yields nothing
        if layout.selection:
            return self.epoch_plan()["batches"]
        count = layout.batches_per_epoch
        if count == 0:
            raise TypeError("the producer does not know its batches per epoch")
        return count

    def _nothing_left_for_fresh_loader(self, layout: RingLayout) -> bool:
        """A loader that has taken nothing, on a finished ring whose lane has nothing left:
        its first ``for`` would yield nothing. (A loader that iterated learns the end when
        it next iterates, which raises :class:`StreamFinished`.)"""
        if self._last_taken is not None or not layout.epochs:
            return False
        if self._live_ring().producer_state != FINISHED:
            return False
        return self._next_position()["epoch"] >= layout.epochs

    def epoch_plan(self) -> dict[str, int]:
        """The next epoch's plan in this lane: ``{"epoch", "batches", "kept", "pruned"}``
        (``kept``/``pruned``: samples served/left out over all ranks). Without selection,
        every epoch keeps everything. With selection, waits (like a take: liveness checks,
        ``timeout``) until the producer has decided the epoch, which needs every lane of its
        node to have finished the previous one."""
        layout = self.layout
        epoch = self._next_position()["epoch"]
        if not layout.selection:
            return {
                "epoch": epoch,
                "batches": layout.batches_per_epoch,
                "kept": layout.samples_per_epoch,
                "pruned": 0,
            }
        self._send_epoch_done()
        ring = self._live_ring()
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            seen = ring.publish_seq(self.lane)
            state = ring.producer_state
            plan = ring.lane_plan(self.lane)
            if plan is not None and plan["epoch"] == epoch:
                return plan
            if state == FINISHED:
                return {"epoch": epoch, "batches": 0, "kept": 0, "pruned": 0}
            self._check_producer(ring, state)
            wait_s = self._wait_slice(
                deadline, f"epoch {epoch} of {self.name!r} not decided within {self._timeout} s"
            )
            ring.wait(self.lane, seen, wait_s)

    # ----- feedback ---------------------------------------------------------------------------

    def report(self, sample_ids: Any, losses: Any) -> None:
        """Report per-sample losses to the daemon (§9): ``sample_ids`` as in the batch's
        ``sample_ids`` tensor, one loss per id, as numpy arrays, lists or torch tensors on any
        device (one device-to-host copy per call).

        Never blocks: when the daemon is busy the frame waits in this loader and goes out with
        the next call (or at close). Losses are attributed to the epoch of the last batch
        taken; a report for a sample not served this epoch is accepted. NaN, infinite and
        negative losses are counted and ignored by the daemon. Ids outside the dataset raise
        ``ValueError`` naming them, before anything is sent.

        When ``torch.distributed`` is initialised with several ranks, every rank must call
        ``report`` at the same points (it is a collective): the reports of all ranks are
        gathered and each node's daemon receives all of them (see :meth:`report_gathered`).
        """
        ids, values = feedback.host_arrays(sample_ids, losses)
        dist = feedback.distributed()
        if dist is not None:
            self.report_gathered(feedback.all_gather(dist, ids, values))
            return
        feedback.check_ids(ids, self.layout.samples_per_epoch)
        self._send_report(ids, values)

    def report_gathered(self, per_rank: Any) -> None:
        """Forward a report gathered from every rank (``per_rank[g] = (ids, losses)`` of
        global rank ``g``): this lane sends the ranks ``g`` with ``g % lane_count == lane``,
        so the lanes of each node together send every rank's losses exactly once, and every
        node's daemon sees all of them in the same order."""
        ids, values = feedback.lane_share(per_rank, self.lane, self.layout.lane_count)
        feedback.check_ids(ids, self.layout.samples_per_epoch)
        self._send_report(ids, values)

    def _send_report(self, ids: Any, values: Any) -> None:
        if ids.size == 0:
            return
        epoch = 0 if self._last_taken is None else self._last_taken[0]
        self._outbox.send(self._sock, feedback.report_frame(epoch, ids, values))

    def _send_epoch_done(self) -> None:
        """After the last batch of an epoch: tell the producer every report of it was sent."""
        if self._last_taken is None or not self._last_taken[1]:
            return
        if self._ring is not None and self._ring.layout.on_demand:
            return  # passes are not epochs: nothing waits for them
        epoch = self._last_taken[0]
        if epoch > self._epoch_done_sent:
            self._epoch_done_sent = epoch
            self._outbox.send(self._sock, feedback.epoch_done_frame(epoch))

    # ----- iteration --------------------------------------------------------------------------

    def __iter__(self) -> Loader:
        if self._ring is not None and self._ring.layout.on_demand:
            self._start_pass()
        return self

    def __next__(self) -> Batch:
        previous = self._previous
        if previous is not None:
            previous.release()  # then forget it: an interrupt in between leaves it tracked
            self._previous = None
        if self._epoch_ended:
            self._epoch_ended = False
            self._send_epoch_done()
            raise StopIteration
        if self._finished:
            raise self._stream_finished()
        if self.layout.on_demand and self._pass_next is None:
            self._start_pass()  # next(loader) without iter(): a pass all the same
        return self._next_batch(iterating=True)

    def _stream_finished(self) -> StreamFinished:
        layout = self.layout
        reason = (
            f"ring {self.name!r} has finished: the producer served its last epoch"
            f" ({layout.epochs} epoch(s) of {layout.batches_per_epoch} batches per lane) and"
            f" lane {self.lane} has nothing left. Restart the daemon with more epochs"
            " (--epochs, or 0 for unbounded), or resume at an earlier epoch"
            " (Loader(..., resume=...))"
        )
        if not self._finish_logged:
            self._finish_logged = True
            _log.warning("%s", reason)
        return StreamFinished(reason)

    def _start_pass(self) -> None:
        """On an on-demand ring: give back the batch of the loop before, and ask the producer
        for a new pass from the first batch (a ``PASS`` frame, §9). Batches still ready from
        an earlier pass are taken and given back unread as they come (their slot ``epoch``
        is another pass's)."""
        self._refuse_if_inherited()
        previous = self._previous
        if previous is not None:
            previous.release()
            self._previous = None
        ring = self._live_ring()
        with self._lock:  # a take under way in another thread filters by these
            self._pass = max(self._pass, ring.lane_stats(self.lane)["epoch"]) + 1
            self._pass_next = 0
            self._epoch_ended = False
            self._cursor = (self._pass, 0)
            number = self._pass
        self._outbox.send(self._sock, feedback.pass_frame(number, 0))

    def restart_epoch(self) -> None:
        """Start again at the first batch of the epoch this lane is in (the epoch of the next
        batch it would deliver), e.g. for a fresh loader that must see a whole epoch rather
        than wherever the daemon has got to. Re-attaches with ``resume`` (§7): batches held
        now are released. On an on-demand ring it abandons the pass under way, and the next
        ``for`` starts a new one."""
        self._refuse_if_inherited()
        if self.layout.on_demand:
            self._pass_next = None
            self._epoch_ended = False
            return
        # The saved position (with the producer's fingerprint, so the resume is checked)
        # moved to the epoch's first batch.
        position = self._saved_position()
        position["index"] = 0
        if "sample" in position:
            position["sample"] = 0
        resume = self._resume_arg(position)
        if self._sock is not None:
            self._detach(release_held=True)
        self._epoch_ended = False
        self._attach(resume, max(self._wait_for_producer, REATTACH_PATIENCE_S))

    def next_batch(self) -> Batch:
        """Take the next batch, ignoring epoch boundaries (blocking).

        Raises :class:`StreamFinished` (a ``StopIteration``) at the end of the stream (the
        producer finished its last epoch), :class:`ProducerGone` or :class:`RingTimeout`. On
        an on-demand ring, passes follow each other: a new one is asked for when none is
        under way.
        """
        if self.layout.on_demand and self._pass_next is None:
            self._start_pass()
        return self._next_batch(iterating=False)

    def _next_batch(self, *, iterating: bool) -> Batch:
        if self._finished and self._ring is None:
            raise StopIteration  # the run ended while this loader was re-attaching
        self._retire_pending(wait=False)
        self._send_epoch_done()
        self._outbox.send(self._sock)
        slots = self.layout.slots_per_lane
        while len(self._held) + len(self._pending) >= slots and self._retire_pending(wait=True):
            pass  # every slot is ours: wait for the oldest device copy instead of deadlocking
        held_now = len(self._held) + len(self._pending)
        if held_now >= slots or (self._max_held is not None and held_now >= self._max_held):
            limit = slots if self._max_held is None else min(slots, self._max_held)
            raise RingfeedError(
                f"already holding {held_now} batches (limit {limit}); release one first"
            )
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        while True:
            try:
                return self._take_blocking(deadline, iterating)
            except _EndOfStream:
                self._finished = True
                raise self._stream_finished() from None
            except ProducerGone:
                if self._wait_for_producer <= 0:
                    raise
                # Read from the old ring's memory before leaving it (nothing taken yet: the
                # position comes from its slots and lane counters).
                on_demand = self.layout.on_demand
                position: Optional[dict[str, Any]] = self._saved_position()
                if on_demand:
                    # The pass under way continues where it stopped (a resume on an on-demand
                    # ring asks for that pass from that batch); between passes, nothing.
                    position = (
                        None
                        if self._pass_next is None
                        else {"epoch": self._pass, "index": self._pass_next}
                    )
                self._detach(release_held=False)
                try:
                    self._attach(self._resume_arg(position), self._wait_for_producer)
                except AttachError as err:
                    if err.code != "finished":
                        raise
                    self._finished = True  # its producer had finished the run: the end
                    raise StopIteration from None

    def _take_blocking(self, deadline: Optional[float], iterating: bool) -> Batch:
        lane = self.lane
        while True:
            ring = self._live_ring()
            seen = ring.publish_seq(lane)
            state = ring.producer_state  # loaded before the scan: see _check_producer
            batch = self._try_take(ring, iterating)
            if batch is _STALE:
                continue
            if isinstance(batch, Batch):
                return batch
            if self._retire_pending(wait=False) or self._retire_pending(wait=True):
                continue  # the lane ran dry: hand back a slot whose device copy is done
            self._check_producer(ring, state)
            wait_s = self._wait_slice(
                deadline, f"no batch in lane {lane} of {self.name!r} within {self._timeout} s"
            )
            started = time.monotonic_ns()
            try:
                ring.wait(lane, seen, wait_s)
            finally:
                ring.note_consumer(lane, waited_ns=time.monotonic_ns() - started)

    @staticmethod
    def _wait_slice(deadline: Optional[float], timeout_message: str) -> float:
        """How long the next futex wait may last: one slice between liveness checks, cut to
        the deadline; :class:`RingTimeout` with ``timeout_message`` once it has passed."""
        if deadline is None:
            return WAIT_SLICE_S
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RingTimeout(timeout_message)
        return min(WAIT_SLICE_S, remaining)

    def _try_take(self, ring: Ring, iterating: bool) -> Any:
        """Take the next ready slot, if any, and track it: atomic with respect to other
        threads (the lock) and to Python signal handlers (held back until it is complete).
        A handler that raises at the end gives the slot back, to be delivered next.
        ``iterating``: a ``for`` loop's take, which also records the batch as the one to
        release at the next step and notes an epoch's end. On an on-demand ring a batch that
        is not the next one of the pass under way (an earlier pass's) is given back unread:
        the answer is then ``_STALE``."""
        lane = self.lane
        held = _signals.hold()
        try:
            with self._lock:
                self._reconcile(ring)
                found = ring.next_ready(lane)
                if found is None:
                    _signals.resume(held)
                    return None
                cursor, last_taken = self._cursor, self._last_taken
                self._taking = found  # first: a reconcile undoes a take cut short here
                taken = ring.take_slot(lane, *found)
                if ring.layout.on_demand and (
                    taken.epoch != self._pass or taken.index != self._pass_next
                ):
                    ring.release(lane, taken.slot, taken.seq)
                    self._taking = None
                    _signals.resume(held)
                    return _STALE
                batch = Batch(self, ring, lane, taken)
                self._held[taken.slot] = batch
                self._taking = None
                last = bool(taken.flags & SLOT_LAST_OF_EPOCH)
                self._cursor = (taken.epoch + 1, 0) if last else (taken.epoch, taken.index + 1)
                self._last_taken = (taken.epoch, last)
                if ring.layout.on_demand:
                    self._pass_next = None if last else taken.index + 1
                self._taken += 1
                if iterating:
                    if self._release_previous:
                        self._previous = batch
                    self._epoch_ended = last
        except BaseException:
            _signals.resume(held)
            raise
        try:
            _signals.resume(held)
        except BaseException:  # Ctrl-C arrived during the take: the caller never gets it
            with self._lock:
                self._taking = found
                self._held.pop(taken.slot, None)
                batch._mark_released("its take was interrupted")
                self._cursor, self._last_taken = cursor, last_taken
                if ring.layout.on_demand:
                    self._pass_next = taken.index
                self._taken -= 1
                if iterating:
                    self._previous = None
                    self._epoch_ended = False
                ring.untake(lane, taken.slot)
                self._taking = None
            raise
        return batch

    def _reconcile(self, ring: Ring) -> None:
        """Repair what an exception inside a take or release left half done (a signal whose
        handler is not held back, an error): called with the lock held, before each take.

        The lane page says which slots this attach holds (taken, not released). One that is
        not tracked was either being taken (``_taking``: the take is undone, to be delivered
        next) or being released (it is released); a tracked batch already marked released,
        or whose slot is no longer ours, is forgotten."""
        mine = ring.held_slots(self.lane)
        for slot in mine:
            batch = self._held.get(slot)
            if (batch is not None and not batch.released) or slot in self._deferred:
                continue  # tracked, or released with its hand-back waiting for a device copy
            if batch is not None:
                del self._held[slot]
            if self._taking is not None and self._taking[0] == slot and batch is None:
                ring.untake(self.lane, slot)
            else:
                ring.release(self.lane, slot)
        self._taking = None
        for slot, batch in list(self._held.items()):
            if batch.released or slot not in mine:
                del self._held[slot]
                batch._mark_released("its slot was no longer held by this loader")

    def _check_producer(self, ring: Ring, state: int) -> None:
        """Called when no slot was ready. ``state`` was loaded *before* the scan, so a
        FINISHED seen here means every batch was already published and scanned."""
        if state == FINISHED:
            raise _EndOfStream
        pid = ring.layout.producer_pid
        if state == STOPPED:
            raise ProducerGone(f"producer of {self.name!r} stopped", reason="stopped", pid=pid)
        if state == FAILED:
            raise ProducerGone(
                f"producer of {self.name!r} failed: {ring.last_error}", reason="failed", pid=pid
            )
        if state >= len(PRODUCER_STATES):
            raise FormatError("producer_state", f"{state} not in 0..4")
        if self._sock is None or protocol.peer_hung_up(self._sock):
            raise ProducerGone(
                f"producer of {self.name!r} closed its connection (it died)", reason="died", pid=pid
            )
        heartbeat = ring.heartbeat_mono_ns
        if heartbeat and time.monotonic_ns() - heartbeat > HEARTBEAT_STALE_NS:
            raise ProducerGone(
                f"producer of {self.name!r} is frozen (heartbeat older than 3 s)",
                reason="frozen",
                pid=pid,
            )

    def _release(self, batch: Batch) -> None:
        if batch.released:
            return
        if self._inherited():
            batch._mark_released(self._disowned)
            return
        held = _signals.hold()
        try:
            with self._lock:
                self._release_locked(batch._ring, batch)
        finally:
            _signals.resume(held)

    def _release_locked(self, ring: Ring, batch: Batch) -> None:
        if batch.released:
            return
        fences = batch._mark_released()  # first: from here on the caller cannot read it
        if self._held.get(batch.slot) is batch:
            del self._held[batch.slot]
        if self._pinned_address is not None:
            # A hand-made x.cuda(non_blocking=True) from a pinned view is only enqueued: an
            # event on the current stream now completes once such copies have read the slot.
            fence = current_stream_fence()
            if fence is not None:
                fences += (fence,)
        lane, slot, seq = batch.lane, batch.slot, batch.seq
        deferred = self._deferred  # not `self`: a pending entry must not keep the loader alive

        def give_back() -> None:
            # Only if the batch's own lane page still holds it: released once, never twice.
            ring.release(lane, slot, seq)
            deferred.discard(slot)

        if fences and not all(fence.query() for fence in fences):
            deferred.add(slot)
            self._pending.defer(fences, give_back)
        else:
            give_back()

    def _retire_pending(self, *, wait: bool) -> bool:
        """Hand back the slots whose device copies completed (``wait``: block on the oldest
        pending one instead); whether any was handed back. One step, like a release."""
        if not self._pending:
            return False
        held = _signals.hold()
        try:
            with self._lock:
                if wait:
                    return self._pending.wait_oldest()
                return self._pending.retire_completed() > 0
        finally:
            _signals.resume(held)

    # ----- state ------------------------------------------------------------------------------

    def _next_position(self) -> dict[str, int]:
        if self._cursor is not None:
            return {"epoch": self._cursor[0], "index": self._cursor[1]}
        ring = self._live_ring()
        ready = ring.peek(self.lane)  # nothing taken yet: what would be delivered next
        if ready is not None:
            return {"epoch": ready.epoch, "index": ready.index}
        lane = ring.lane_stats(self.lane)
        if lane["published"] == 0:
            return {"epoch": 0, "index": 0}
        per_epoch = ring.layout.batches_per_epoch
        plan = ring.lane_plan(self.lane) if ring.layout.selection else None
        if plan is not None and plan["epoch"] == lane["epoch"]:
            per_epoch = plan["batches"]
        if per_epoch and lane["index"] + 1 >= per_epoch:
            return {"epoch": lane["epoch"] + 1, "index": 0}
        return {"epoch": lane["epoch"], "index": lane["index"] + 1}

    @property
    def epoch(self) -> int:
        """Epoch of the next batch this loader will deliver."""
        return self._next_position()["epoch"]

    def _saved_position(self) -> dict[str, Any]:
        """The next batch, its ``sample`` position and the producer's fingerprint (when the
        producer published one): what a resume needs to be checked and mapped."""
        position: dict[str, Any] = dict(self._next_position())
        fingerprint = self._fingerprint
        if fingerprint is not None:
            batch = fingerprint.get("batch_size")
            world = fingerprint.get("world_size")
            if isinstance(batch, int) and isinstance(world, int):
                position["sample"] = position["index"] * batch * max(world, 1)
            position["fingerprint"] = dict(fingerprint)
        return position

    def state_dict(self) -> dict[str, Any]:
        """The next unconsumed batch and what it is a position in: ``epoch``, ``index`` (batch
        within the epoch), ``sample`` (samples of the epoch's global order, all ranks together,
        consumed before it: ``index × batch_size × world_size``), ``fingerprint`` (what
        defines that order and its batches, as the producer published it), ``lane`` and
        ``generation``. Plain JSON-able values: save it in a checkpoint.

        A batch counts as consumed once it has been yielded. Pass the dict back as
        ``Loader(..., resume=state)`` or to :meth:`load_state_dict`; see ``resume`` for what
        a daemon with another configuration does with it.
        """
        return {**self._saved_position(), "lane": self.lane, "generation": self.generation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-attach with ``resume`` = ``state``: the producer seeks this lane to it (§7).

        Batches held now are released first.
        """
        self._refuse_if_inherited()
        resume = self._resume_arg(state, public=True)
        if self._sock is not None:
            self._detach(release_held=True)
        self._epoch_ended = False
        self._attach(resume, max(self._wait_for_producer, REATTACH_PATIENCE_S))

    def evaluation(self) -> dict[str, Any]:
        """The daemon's evaluation of reported losses (what ``ringfeed stat`` shows):
        ``reports`` counters, ``scores``, ``selection`` and per-epoch ``loss_by`` augmentation
        bucket and ``loss_by_class``. See docs/feedback.md for how to read it."""
        return evaluation(self.name, runtime_dir=self._runtime_dir, trust_uid=self._trust_uid)

    def _socket_path(self) -> Any:
        return socket_path(self.name, self._runtime_dir, trust_uid=self._trust_uid)

    @property
    def classes(self) -> Optional[list[str]]:
        """The class names, label ``i`` being ``classes[i]`` (format 1.3): ``[source]
        classes``, an ImageFolder's directory names (sorted, as torchvision's
        ``ImageFolder.classes``), ``index.json`` beside the shards (``ringfeed pack``) or
        ``classes.txt`` beside them. ``None`` when the daemon knows none (or refused a
        malformed file: its log says why). Asked once, then cached."""
        if not hasattr(self, "_classes"):
            self._refuse_if_inherited()
            reply = protocol.long_request(
                self._socket_path(), {"op": "classes"}, trust_uid=self._trust_uid
            )
            names = reply.get("classes")
            self._classes = [str(n) for n in names] if isinstance(names, list) else None
        return self._classes

    @property
    def num_classes(self) -> Optional[int]:
        """``len(loader.classes)``, or ``None`` when the names are unknown."""
        classes = self.classes
        return None if classes is None else len(classes)

    def describe(self, sample_ids: Any) -> list[dict[str, Any]]:
        """Where each sample came from (format 1.3): for every id (a batch's ``sample_ids``, a
        list, a tensor), ``{"id", "shard", "member", "path"}``: the tar shard and member
        (``shard`` is ``None`` for an ImageFolder), and the original file (an ImageFolder's
        image, or the file ``ringfeed pack`` made the member from, kept in its
        ``index.json``; ``None`` when unknown). ``"stream"`` is added in a mixture; an id
        outside the dataset gets ``{"id", "error"}``."""
        self._refuse_if_inherited()
        if hasattr(sample_ids, "detach"):
            sample_ids = sample_ids.detach().cpu().numpy()
        ids = [int(i) for i in list(getattr(sample_ids, "tolist", lambda: sample_ids)())]
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), protocol.MAX_DESCRIBE_IDS):
            chunk = ids[start : start + protocol.MAX_DESCRIBE_IDS]
            if any(i < 0 for i in chunk):
                raise ArgumentError(f"sample ids must be >= 0, got {min(chunk)}")
            reply = protocol.long_request(
                self._socket_path(), {"op": "describe", "ids": chunk}, trust_uid=self._trust_uid
            )
            samples = reply.get("samples")
            if not isinstance(samples, list) or len(samples) != len(chunk):
                raise FormatError(
                    "describe", f"expected {len(chunk)} entries, got {samples!r:.100}"
                )
            out += samples
        return out

    def stats(self) -> LoaderStats:
        """Starvation figures since attach (:class:`ringfeed.LoaderStats`): ``wait_share`` is
        the fraction of wall time this consumer spent blocked waiting for a batch (lane
        ``consumer_wait_ns`` / wall time); counts and nanoseconds are integers."""
        ring = self._live_ring()
        lane = ring.lane_stats(self.lane)
        own = ring.consumer_counters(self.lane)  # this attach's lane page: exact, current
        return LoaderStats(
            wall_ns=max(1, time.monotonic_ns() - self._stats_start_ns),
            wait_ns=own["consumer_wait_ns"],
            producer_wait_ns=lane["producer_wait_ns"],
            taken=self._taken,
            held=len(self._held),
            pending_release=len(self._pending),
            ready=ring.ready_count(self.lane),
            published=lane["published"],
            released=lane["released"],
        )

    def __repr__(self) -> str:
        state = "closed" if self._ring is None else f"generation={self.generation}"
        return f"<ringfeed.Loader {self.name!r} lane={self.lane} {state}>"
