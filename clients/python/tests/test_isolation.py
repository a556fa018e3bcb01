"""Format 2.0 (issue 24 item 4): a consumer can write only its own lane page and doorbell.

Each test runs against the reference producer (ring_writer.py) and, when the binary is there,
the real ``ringfeed serve``: the ring descriptor of an attach cannot be mapped writable, the
client's mappings of the ring refuse every write (a raw store faults), a hostile consumer that
scribbles its lane page cannot stop or starve another lane, a fork()ed child cannot write its
parent's lane page, the producer copies the consumers' counters, and the client refuses an
attach reply that breaks the handshake (writer only: it can be made hostile).
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import hashlib
import mmap
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringfeed
from conftest import MakeWriter, Spawn
from helpers import read_report, wait_until
from ring_writer import RingWriter
from ringfeed import protocol
from ringfeed.runtime import socket_path
from test_daemon import SKIP_REASON, started_daemons

F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


@dataclass
class Producer:
    """A 2.0 producer serving two lanes of three slots (endless epochs)."""

    kind: str
    name: str
    runtime_dir: Path
    loader: Callable[..., ringfeed.Loader]  # (lane, **Loader options), once it serves
    stop: Callable[[], None]
    process: Any = None  # the daemon's Popen


StartProducer = Callable[[], Producer]


@pytest.fixture(params=["writer", "daemon"])
def start(
    request: pytest.FixtureRequest, make_writer: MakeWriter, runtime_dir: Path, tmp_path: Path
) -> Iterator[StartProducer]:
    if request.param == "daemon":
        if SKIP_REASON is not None:
            pytest.skip(SKIP_REASON)
        daemons = started_daemons(runtime_dir, tmp_path)
        serve = next(daemons)

        def start_daemon() -> Producer:
            daemon = serve(
                "--lanes", 2, "--batch-size", 4, "--epochs", 1000, "--seed", 5,
                "--workers", 2, "--slots-per-lane", 3,
            )  # fmt: skip
            return Producer(
                "daemon", "e2e", runtime_dir, daemon.loader, daemon.close, daemon.process
            )

        yield start_daemon
        next(daemons, None)  # teardown: kill what is left
        return
    started: list[RingWriter] = []

    def start_writer() -> Producer:
        name = f"t{len(started)}"
        writer = make_writer(name, lanes=2, slots=3, batches_per_epoch=12, epochs=1000)
        writer.start_producing()
        started.append(writer)

        def loader(lane: int, **options: Any) -> ringfeed.Loader:
            return ringfeed.Loader(name, lane, runtime_dir=runtime_dir, **options)

        return Producer("writer", name, runtime_dir, loader, writer.stop)

    yield start_writer


def digest(batch: ringfeed.Batch) -> tuple[int, int, list[int], str]:
    images = np.ascontiguousarray(batch.images).tobytes()
    return batch.epoch, batch.index, batch.sample_ids.tolist(), hashlib.blake2b(images).hexdigest()


def read(loader: ringfeed.Loader, count: int) -> list[tuple[int, int, list[int], str]]:
    out = []
    for _ in range(count):
        with loader.next_batch() as batch:
            out.append(digest(batch))
    return out


def fork_and_wait(child: Callable[[], int]) -> int:
    """Run ``child`` in a fork()ed child; its wait status."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:
        code = 99
        try:
            faulthandler.disable()  # an expected fault: no traceback on the test's stderr
            code = child()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


# ----- the ring is read-only to consumers ------------------------------------------------------


def test_the_ring_descriptor_of_an_attach_cannot_be_written(start: StartProducer) -> None:
    producer = start()
    producer.loader(0).close()  # serving
    sock, reply, fds = protocol.attach(socket_path(producer.name, producer.runtime_dir), 1)
    try:
        assert reply["fds"] == ["ring", "lane", "doorbell"]
        assert fcntl.fcntl(fds.ring, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        size = os.fstat(fds.ring).st_size
        with pytest.raises(PermissionError):  # EACCES: the descriptor is read-only
            mmap.mmap(fds.ring, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError, match=r"Invalid argument|Bad file descriptor"):
            os.ftruncate(fds.ring, 0)  # EINVAL: not open for writing
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.pwrite(fds.ring, b"\x03", 44)  # producer_state = STOPPED
        if fcntl.fcntl(fds.ring, F_GET_SEALS) & F_SEAL_FUTURE_WRITE:
            # The same uid can reopen the memfd writable through /proc; the seal still
            # refuses every new writable mapping and every write.
            writable = os.open(f"/proc/self/fd/{fds.ring}", os.O_RDWR | os.O_CLOEXEC)
            try:
                with pytest.raises(PermissionError):
                    mmap.mmap(writable, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                with pytest.raises(PermissionError):
                    os.pwrite(writable, b"\x03", 44)
            finally:
                os.close(writable)
        # The lane page is the consumer's to write (and only it).
        assert fcntl.fcntl(fds.lane, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        assert os.fstat(fds.lane).st_size == reply["lane_page_bytes"]
    finally:
        fds.close()
        sock.close()


def test_the_clients_ring_mappings_refuse_every_write(start: StartProducer) -> None:
    producer = start()
    with producer.loader(0) as loader:
        batch = loader.next_batch()
        ring = loader.ring
        with pytest.raises(TypeError):  # a read-only buffer
            ring._control[44:48] = (3).to_bytes(4, "little")  # producer_state = STOPPED
        with pytest.raises(TypeError):
            memoryview(ring._data)[0] = 1  # another lane's batch, or this one
        with pytest.raises(ValueError, match="read-only"):
            batch.images[0] = 0
        state = ring.producer_state
        address = ring._control_array.ctypes.data + 44

        def store_producer_state() -> int:
            ctypes.c_uint32.from_address(address).value = 3  # must fault
            return 0

        status = fork_and_wait(store_producer_state)
        assert os.WIFSIGNALED(status), f"a raw store went through: {status}"
        assert os.WTERMSIG(status) == signal.SIGSEGV
        assert ring.producer_state == state
        assert loader.next_batch().epoch >= batch.epoch


# ----- a hostile consumer hurts only its own lane ----------------------------------------------


def test_a_consumer_scribbling_its_lane_page_cannot_stop_or_starve_another_lane(
    start: StartProducer, spawn: Spawn
) -> None:
    count = 24
    clean = start()
    lane0, lane1 = clean.loader(0), clean.loader(1)
    from_start = lane1.state_dict()
    want0, want1 = read(lane0, count), read(lane1, count)
    lane0.close()
    lane1.close()
    clean.stop()

    hostile = start()
    lane0 = hostile.loader(0, timeout=30)
    scribbler = spawn("consumer_proc.py", "scribble", hostile.name, hostile.runtime_dir, 1)
    assert read_report(scribbler)["ready"]
    assert read(lane0, count) == want0  # every batch, bit-identical, none lost or torn
    assert scribbler.poll() is None, "the scribbler stopped before lane 0 was read"
    assert lane0.ring.producer_state == ringfeed.layout.SERVING
    scribbler.kill()
    scribbler.wait()
    # A new consumer of the hostile lane reads it from the start, as the clean run did.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ringfeed.RingfeedWarning)  # the writer: no fingerprint
        lane1 = hostile.loader(1, resume=from_start, wait_for_producer=30, timeout=30)
    assert read(lane1, count) == want1
    lane0.close()
    lane1.close()
    if hostile.process is not None:  # the daemon still stops promptly
        hostile.process.send_signal(signal.SIGTERM)
        assert hostile.process.wait(timeout=2) == 0


# ----- fork -------------------------------------------------------------------------------------


def test_a_forked_child_cannot_write_its_parents_lane_page(start: StartProducer) -> None:
    producer = start()
    with producer.loader(0, release_previous=False) as loader:
        batch = loader.next_batch()
        ring = loader.ring
        page = ring.lane_page
        assert page is not None

        def release_through_the_client() -> int:
            try:
                ring.release(0, batch.slot, batch.seq)
            except ringfeed.RingfeedError as err:
                return 0 if "fork()" in str(err) else 2
            return 1

        assert os.waitstatus_to_exitcode(fork_and_wait(release_through_the_client)) == 0
        address = ctypes.addressof(page._slots[batch.slot]) + 8  # released_seq

        def store_released_seq() -> int:
            ctypes.c_uint64.from_address(address).value = batch.seq  # must fault
            return 0

        status = fork_and_wait(store_released_seq)
        assert os.WIFSIGNALED(status), f"the child released the parent's batch: {status}"
        assert os.WTERMSIG(status) == signal.SIGSEGV
        assert ring.holds(0, batch.slot, batch.seq)
        assert page.released_seq(batch.slot) != batch.seq
        batch.release()
        assert page.released_seq(batch.slot) == batch.seq


# ----- statistics -------------------------------------------------------------------------------


def test_the_producer_copies_the_consumers_counters(start: StartProducer) -> None:
    producer = start()
    with producer.loader(1) as loader:
        before = time.monotonic_ns()
        read(loader, 5)
        ring = loader.ring
        own = ring.consumer_counters(1)
        assert (own["taken"], own["released"]) == (5, 5)
        assert before <= own["heartbeat_mono_ns"] <= time.monotonic_ns()
        assert loader.stats().taken == 5
        # Copied at the producer's heartbeat (statistics only, never used for a decision).
        wait_until(lambda: ring.lane_stats(1)["released"] == 5, "the lane's released copy", 5)


# ----- the handshake ----------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("hostile", "error", "match"),
    [
        ("no lane page", ringfeed.AttachError, "carried 1 file descriptors, expected 3"),
        ("two", ringfeed.AttachError, "carried 2 file descriptors, expected 3"),
        ("four", ringfeed.AttachError, "carried 4 file descriptors, expected 3"),
        ("five", ringfeed.AttachError, "more than 3 descriptors"),
        ("late", ringfeed.AttachError, "descriptors after the reply's first bytes"),
        ("writable ring", ringfeed.AttachError, "ring descriptor is writable"),
        ("unnamed", ringfeed.AttachError, "names its descriptors"),
        ("reply size", ringfeed.FormatError, "lane_page_bytes"),
        ("swapped", ringfeed.FormatError, "lane_page_bytes"),
        ("magic", ringfeed.FormatError, "lane_page.magic"),
        ("lane", ringfeed.FormatError, "lane_page.lane"),
        ("slots", ringfeed.FormatError, "lane_page.slots"),
        ("unsealed page", ringfeed.FormatError, "F_SEAL_SHRINK"),
    ],
)
def test_an_attach_reply_that_breaks_the_handshake_is_refused_leaking_nothing(
    make_writer: MakeWriter, runtime_dir: Path, hostile: str, error: type[Exception], match: str
) -> None:
    writer = make_writer(slots=3)
    writer.publish(0)
    made: list[int] = []

    def unsealed_page(fds: list[int]) -> list[int]:
        """The lane page's bytes in a memfd that could shrink under the client's stores."""
        size = os.fstat(fds[1]).st_size
        fd = os.memfd_create("unsealed", os.MFD_CLOEXEC)
        made.append(fd)
        os.ftruncate(fd, size)
        os.pwrite(fd, os.pread(fds[1], size, 0), 0)
        return [fds[0], fd, fds[2]]

    hooks: dict[str, Callable[[list[int]], list[int]]] = {
        "unsealed page": unsealed_page,
        "no lane page": lambda fds: fds[:1],
        "two": lambda fds: fds[:2],
        "four": lambda fds: [*fds, fds[2]],
        "five": lambda fds: [*fds, fds[2], fds[2]],
        "writable ring": lambda fds: [writer.fd, *fds[1:]],
        "swapped": lambda fds: [fds[0], fds[0], fds[2]],
    }
    pages: dict[str, Callable[[mmap.mmap], None]] = {
        "magic": lambda mem: mem.__setitem__(slice(0, 8), b"RFLANEXX"),
        "lane": lambda mem: mem.__setitem__(slice(8, 12), (5).to_bytes(4, "little")),
        "slots": lambda mem: mem.__setitem__(slice(12, 16), (4).to_bytes(4, "little")),
    }
    writer.reply_fds_hook = hooks.get(hostile)
    writer.page_hook = pages.get(hostile)
    if hostile == "unnamed":
        writer.reply_extra = {"fds": ["lane", "ring", "doorbell"]}
    if hostile == "reply size":
        writer.reply_extra = {"lane_page_bytes": 8192}
    writer.fds_late = hostile == "late"
    before = fd_count()
    with pytest.raises(error, match=match) as caught:
        ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0)
    if isinstance(caught.value, ringfeed.AttachError):
        assert caught.value.code == "protocol"
    for fd in made:
        os.close(fd)
    writer.wait_detached(0)  # the writer lives in this process: its page is gone now too
    wait_until(lambda: fd_count() == before, f"no descriptor leaked ({fd_count()} != {before})")
    # The same producer, honest again, is attached to.
    writer.reply_fds_hook, writer.page_hook, writer.reply_extra = None, None, {}
    writer.fds_late = False
    with ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0) as loader:
        assert loader.next_batch().index == 0


def test_a_release_rings_the_doorbell_and_a_saturated_one_is_no_error(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=3)  # nothing produces on its own: nobody drains the doorbell
    writer.publish(0)
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir, release_previous=False) as loader:
        doorbell = writer.pages[0].doorbell
        loader.next_batch().release()
        assert os.eventfd_read(doorbell) == 1
        os.eventfd_write(doorbell, 2**64 - 2)  # the counter's maximum
        loader.next_batch().release()  # EAGAIN, ignored: the producer is woken already
        assert os.eventfd_read(doorbell) == 2**64 - 2
        assert loader.ring.consumer_counters(0)["released"] == 2
