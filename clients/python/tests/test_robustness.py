"""The trainer-side hazards of issue 23, each reproduced against the real ``ringfeed serve``:
a re-attach after a pause, resuming a finished run, a producer lost before the first batch,
PID namespaces (``unshare --pid``), ``fork()``, a dropped loader (``gc.disable()``), a signal
storm inside take/release, and threads sharing a loader. docs/failure-modes.md has a row for
each, saying what happens now."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import numpy as np
import pytest

import ringfeed
from conftest import HERE, Spawn
from helpers import read_line, read_report, wait_until
from test_daemon import BINARY, SKIP_REASON, StartDaemon, started_daemons

if TYPE_CHECKING:
    from _typeshed import TraceFunction

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


@pytest.fixture
def serve(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    yield from started_daemons(runtime_dir, tmp_path)


ENDLESS = ("--lanes", 1, "--batch-size", 4, "--epochs", 1000, "--seed", 5, "--workers", 2)


def held_slots(loader: ringfeed.Loader) -> list[int]:
    """The slots the loader's lane page says it holds (taken, not released)."""
    return loader.ring.held_slots(loader.lane)


# ----- 1. re-attaching to the same daemon after a pause ------------------------------------


def test_batches_of_a_connection_declared_dead_are_never_read_or_released(
    serve: StartDaemon,
) -> None:
    daemon = serve(*ENDLESS, "--slots-per-lane", 4)
    loader = daemon.loader(wait_for_producer=60, release_previous=False)
    old = [loader.next_batch(), loader.next_batch()]
    first_socket = loader._sock
    outcome: list[object] = []

    def take() -> None:
        try:
            while True:  # batches published before the pause come first
                batch = loader.next_batch()
                if loader._sock is not first_socket:
                    outcome.append(batch)
                    return
                batch.release()
        except BaseException as err:
            outcome.append(err)

    # A pause longer than the 3 s heartbeat limit (Ctrl-Z, a debugger, a VM pause): the loader
    # declares the producer gone and re-attaches to the same daemon, same generation.
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        wait_until(lambda: loader._sock is not first_socket, "the loader to re-attach", 30)
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    thread.join(timeout=60)
    new = outcome[0]
    assert isinstance(new, ringfeed.Batch), new
    # The daemon took the old slots back and refills them: the old batches must not be read...
    for batch in old:
        with pytest.raises(ringfeed.ReleasedBatchError, match=r"connection .* ended"):
            batch.sample_ids  # noqa: B018
    # ...and releasing them must not free slots that now belong to the new connection.
    for batch in old:
        batch.release()
    assert held_slots(loader) == [new.slot]
    assert loader.ring.holds(0, new.slot, new.seq)
    new.release()
    assert held_slots(loader) == []
    loader.close()


def test_a_release_proves_it_still_holds_the_batch(serve: StartDaemon) -> None:
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    with daemon.loader(release_previous=False) as loader:
        batch = loader.next_batch()
        ring = loader.ring
        page = ring.lane_page
        assert page is not None
        # An undone take (or a batch this attach never took) is not this attach's to release.
        ring.untake(0, batch.slot)
        assert not ring.release(0, batch.slot, batch.seq), "an untaken batch"
        assert page.released_seq(batch.slot) != batch.seq
        ring.take_slot(0, batch.slot, batch.seq)
        # A release names its batch: another seq in that slot releases nothing.
        assert not ring.release(0, batch.slot, batch.seq + 1)
        assert ring.holds(0, batch.slot, batch.seq)
        released = page.counters()["released"]
        assert ring.release(0, batch.slot, batch.seq)
        assert page.released_seq(batch.slot) == batch.seq
        assert not ring.release(0, batch.slot, batch.seq), "released once, counted once"
        assert page.counters()["released"] == released + 1


def test_a_release_through_an_ended_attach_reaches_nobody(serve: StartDaemon) -> None:
    # A consumer declared dead (a long SIGSTOP) may release afterwards through its old lane
    # page: the daemon dropped that page at reclaim, so the batch, redelivered to the new
    # attach, stays the new attach's and is not refilled under it.
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    loader = daemon.loader(release_previous=False, wait_for_producer=30)
    batch = loader.next_batch()
    old_ring, slot, seq = loader.ring, batch.slot, batch.seq
    loader._detach(release_held=False)  # the connection ends with the batch held
    loader._attach(None, 30)  # no resume: the daemon keeps its READY slots for the new attach
    again = loader.next_batch()
    assert (again.seq, again.slot, again.redelivered) == (seq, slot, True)
    ids = again.sample_ids.copy()
    assert old_ring.release(0, slot, seq)  # the old page still says "held": it writes there
    assert loader.ring.holds(0, slot, seq)
    for _ in range(6):  # the daemon refills the other two slots three times over
        loader.next_batch().release()
    assert np.array_equal(again.sample_ids, ids)
    assert loader.ring.holds(0, slot, seq)
    loader.close()


# ----- 2. resuming a finished run ------------------------------------------------------------


def test_resuming_at_the_end_of_a_finished_run_ends_and_the_daemon_exits(
    serve: StartDaemon,
) -> None:
    daemon = serve(
        "--lanes", 2, "--batch-size", 8, "--epochs", 1, "--seed", 3, "--workers", 2,
        "--exit-when-done",
    )  # fmt: skip
    lane0 = daemon.loader(0, timeout=20)
    lane1 = daemon.loader(1, release_previous=False, timeout=20)
    assert list(lane0), "lane 0 served its epoch"
    batches: list[ringfeed.Batch] = []
    while True:
        try:
            batch = lane1.next_batch()
        except StopIteration:
            break
        if batches:
            batches[-1].release()
        batches.append(batch)
    # Lane 1 still holds its last batch, so the daemon waits. Restart lane 0 from its final
    # checkpoint: {epoch: 1 = epochs, index: 0}.
    final = lane0.state_dict()
    assert (final["epoch"], final["index"]) == (1, 0)
    lane0.load_state_dict(final)
    assert list(lane0) == []  # the stream has ended (it used to block until the timeout)
    lane1.close()
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()
    lane0.close()


# ----- 3. the producer lost before the first batch -------------------------------------------


def test_reconnect_when_the_producer_dies_before_the_first_batch(
    serve: StartDaemon, spawn: Spawn, runtime_dir: Path
) -> None:
    # A producer process that attaches consumers but dies before publishing anything (the
    # real daemon publishes within milliseconds of starting, too soon to kill it reliably).
    early = spawn("ring_writer.py", "--name", "e2e", "--dir", runtime_dir, "--no-produce")
    assert read_line(early).startswith("READY")
    loader = ringfeed.Loader("e2e", runtime_dir=runtime_dir, wait_for_producer=60)
    early.kill()
    early.wait()
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    batch = loader.next_batch()  # re-attaches to the daemon, resuming at the start
    assert (batch.epoch, batch.index) == (0, 0)
    assert loader.generation != 0
    assert daemon.process.poll() is None
    loader.close()


# ----- 4. PID namespaces ---------------------------------------------------------------------


def _unshare_reason() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"unshare --pid is not permitted here: {probe.stderr.decode(errors='replace')}"
    return None


UNSHARE_REASON = _unshare_reason()
needs_unshare = pytest.mark.skipif(UNSHARE_REASON is not None, reason=UNSHARE_REASON or "")
OWN_PID_NS = ("unshare", "--pid", "--fork", "--kill-child")


def unshared(*command: object, runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "RINGFEED_RUNTIME_DIR": str(runtime_dir),
        "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path]),
    }
    return subprocess.run(
        [*OWN_PID_NS, *map(str, command)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip


@needs_unshare
def test_a_daemon_in_its_own_pid_namespace_serves_and_keeps_live_consumers(
    serve: StartDaemon, runtime_dir: Path
) -> None:
    # The daemon cannot see our pid (SO_PEERCRED says 0): attach, hold a batch well past
    # the daemon's 50 ms liveness tick, and keep it; only our socket's EOF frees the lane.
    daemon = serve(*ENDLESS, "--slots-per-lane", 3, prefix=OWN_PID_NS)
    loader = daemon.loader(release_previous=False)
    batch = loader.next_batch()
    ids = batch.sample_ids.copy()
    deadline = time.monotonic() + 1.0  # 20 liveness ticks of the daemon
    while time.monotonic() < deadline:
        assert loader.ring.holds(0, batch.slot, batch.seq), "the daemon took the slot back"
        time.sleep(0.01)
    assert np.array_equal(batch.sample_ids, ids)
    batch.release()
    assert loader.next_batch().index == batch.index + 1
    del loader  # closes the socket: the daemon reclaims the lane at once
    ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir).close()
    # A Rust consumer in a third pid namespace: neither side sees the other's pid.
    done = unshared(BINARY, "consume", "e2e", "--batches", 3, "-q", runtime_dir=runtime_dir)
    assert done.returncode == 0, done.stderr


@needs_unshare
def test_consumers_in_their_own_pid_namespace_attach(serve: StartDaemon, runtime_dir: Path) -> None:
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    daemon.loader().close()  # serving
    rust = unshared(BINARY, "consume", "e2e", "--batches", 3, "-q", runtime_dir=runtime_dir)
    assert rust.returncode == 0, rust.stderr  # it could not read the daemon's credentials
    take_three = (
        "import ringfeed; loader = ringfeed.Loader('e2e');"
        "print([loader.next_batch().index for _ in range(3)])"
    )
    python = unshared(sys.executable, "-c", take_three, runtime_dir=runtime_dir)
    assert python.returncode == 0, python.stderr
    first, second, third = eval(python.stdout)  # the Rust consumer had the first three
    assert (second, third) == (first + 1, first + 2)


# ----- 5. fork() after attaching -------------------------------------------------------------


def _fork() -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        return os.fork()


def test_a_forked_child_inherits_an_inert_loader(serve: StartDaemon) -> None:
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    loader = daemon.loader(release_previous=False)
    batch = loader.next_batch()
    ids = batch.sample_ids.copy()
    done_r, done_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = _fork()
    if pid == 0:  # the child: a DataLoader worker, a multiprocessing fork
        status = 1
        try:
            status = 0
            try:
                loader.next_batch()
                status |= 2
            except ringfeed.RingfeedError as err:
                status |= 0 if "fork()" in str(err) else 4
            try:
                batch.sample_ids  # noqa: B018
                status |= 8
            except ringfeed.ReleasedBatchError:
                pass
            try:
                loader.load_state_dict({"epoch": 0, "index": 0})
                status |= 16
            except ringfeed.RingfeedError as err:
                status |= 0 if "fork()" in str(err) else 32
            batch.release()  # the exit path of a worker: release, close, drop
            loader.close()
            os.write(done_w, b"x")
            select.select([go_r], [], [], 60)  # stay alive while the parent re-attaches
        finally:
            os._exit(status)
    try:
        assert select.select([done_r], [], [], 60)[0], "the child did not report"
        # The child's release and close touched nothing of ours.
        assert loader.ring.holds(0, batch.slot, batch.seq)
        assert np.array_equal(batch.sample_ids, ids)
        assert loader.ring.lane_page is not None
        assert loader.ring.lane_page.released_seq(batch.slot) != batch.seq
        # The child (alive) no longer holds our connection: our re-attach is not refused.
        loader.load_state_dict(loader.state_dict())
        assert loader.next_batch().index == batch.index + 1
    finally:
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (done_r, done_w, go_r, go_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    loader.close()


# ----- 6. a dropped loader -------------------------------------------------------------------


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_loader_detaches_at_once_without_the_cycle_collector(
    serve: StartDaemon, no_gc: None
) -> None:
    daemon = serve(*ENDLESS, "--slots-per-lane", 3)
    daemon.loader().close()  # serving

    def attach() -> ringfeed.Loader:  # no retry: a refusal fails the test
        return ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir, wait_for_producer=0)

    loader = attach()
    batch = next(iter(loader))  # as a `for` loop left with `break` leaves it
    del loader  # `batch` lives on; it must not keep the loader attached
    with pytest.raises(ringfeed.ReleasedBatchError):
        batch.images  # noqa: B018

    def train_until_an_error() -> None:
        for _ in attach():
            raise ValueError("a bug in the training step")

    with contextlib.suppress(ValueError):
        train_until_an_error()
    with attach() as loader:
        assert loader.next_batch().epoch == 0


# ----- 7. a signal storm inside take and release ---------------------------------------------


def test_a_sigint_storm_never_leaks_a_slot(
    serve: StartDaemon, spawn: Spawn, runtime_dir: Path
) -> None:
    daemon = serve(
        "--lanes", 1, "--batch-size", 1, "--epochs", 100000, "--workers", 2,
        "--slots-per-lane", 4,
    )  # fmt: skip
    daemon.loader().close()  # serving
    consumer = spawn("consumer_proc.py", "storm", "e2e", runtime_dir, 0, stdin=subprocess.PIPE)
    assert read_report(consumer) == {"ready": True}
    rng = random.Random(23)
    deadline = time.monotonic() + 10.0
    sent = 0
    while time.monotonic() < deadline and consumer.poll() is None:
        consumer.send_signal(signal.SIGINT)
        sent += 1
        time.sleep(rng.uniform(0, 0.0003))  # pacing: a signal every 0.15 ms on average
    assert consumer.stdin is not None
    consumer.stdin.write("stop\n")
    consumer.stdin.flush()
    result = read_report(consumer)
    assert result["interrupts"] > 0, result
    assert result["cycles"] > 0, result
    # After the final step only the batch just yielded is held, and the loader tracks it.
    assert not result["stuck"], f"every slot leaked: {result}, {sent} SIGINTs"
    assert result["held_in_ring"] == result["tracked"] <= 1, f"{result}, {sent} SIGINTs"
    assert consumer.wait(timeout=30) == 0


# ----- 8. threads sharing a loader -----------------------------------------------------------


CLIENT_DIR = os.path.dirname(ringfeed.__file__)


def _yield_at_every_client_line(frame: FrameType, event: str, arg: object) -> TraceFunction | None:
    """A thread tracer that gives up the GIL before every line of the client's code, so
    that threads interleave inside take and release at every step (as an unlucky scheduler
    could), instead of once in thousands of takes."""
    if not frame.f_code.co_filename.startswith(CLIENT_DIR):
        return None

    def on_line(frame: FrameType, event: str, arg: object) -> TraceFunction:
        if event == "line":
            time.sleep(0)
        return on_line

    return on_line


@pytest.fixture
def interleaving() -> Iterator[None]:
    threading.settrace(_yield_at_every_client_line)
    try:
        yield
    finally:
        threading.settrace(None)


def test_threads_sharing_a_loader_never_take_the_same_slot(
    serve: StartDaemon, interleaving: None
) -> None:
    daemon = serve(
        "--lanes", 1, "--batch-size", 1, "--epochs", 100000, "--workers", 2,
        "--slots-per-lane", 6,
    )  # fmt: skip
    loader = daemon.loader(release_previous=False, timeout=30)
    taken: list[list[int]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def work(mine: list[int]) -> None:
        try:
            while not stop.is_set():
                batch = loader.next_batch()
                mine.append(batch.seq)
                batch.release()
        except BaseException as err:
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=work, args=(mine,), daemon=True) for mine in taken]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(map(len, taken)) >= 300 or stop.is_set(), "300 takes", 120)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    seqs = [seq for mine in taken for seq in mine]
    assert len(seqs) == len(set(seqs)), "a batch was taken by two threads"
    assert held_slots(loader) == []
    loader.close()
