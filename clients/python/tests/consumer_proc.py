"""A consumer process for the multi-process tests: ``python consumer_proc.py MODE NAME DIR LANE``.

Modes: ``hold N`` takes N batches, reports them and sleeps holding them until killed;
``consume`` reads every epoch to the end of the stream and reports each batch;
``interrupt`` blocks waiting for a batch, expects Ctrl-C, and reports the lane's held slots;
``hold-fenced N`` takes N batches, releases each behind a device fence that never completes,
reports the slots and sleeps until killed; ``torch-write`` writes in place through
``batch.torch()``, which must kill it with SIGSEGV (``torch-copy`` writes into
``batch.torch(copy=True)`` instead, which must work); ``storm`` iterates (releasing each batch)
under a storm of SIGINTs until a line arrives on stdin, then reports the slots the ring says
are held next to the batches the loader tracks; ``scribble`` is a hostile consumer (format
2.0): it attaches with the client's handshake only, then writes random bytes and forged
``released_seq`` values over its whole lane page and floods its doorbell, until killed.
Reports are JSON lines on stdout.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import select
import signal
import sys
import time
from types import FrameType
from typing import Any, Optional

import ringfeed
from ringfeed import protocol
from ringfeed.runtime import socket_path


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


class _NeverDone:
    """A device fence whose copy never finishes (a GPU far behind the host)."""

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        raise AssertionError("a pending release was waited for")


def main() -> None:
    mode, name, directory, lane = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "hold":
        loader = ringfeed.Loader(name, lane, runtime_dir=directory, release_previous=False)
        batches = [loader.next_batch() for _ in range(int(sys.argv[5]))]
        report(held=[[b.epoch, b.index, b.seq, b.sample_ids.tolist()] for b in batches])
        while True:
            time.sleep(60)
    elif mode == "hold-fenced":
        loader = ringfeed.Loader(name, lane, runtime_dir=directory, release_previous=False)
        slots = []
        for _ in range(int(sys.argv[5])):
            batch = loader.next_batch()
            batch.release_after(_NeverDone())
            batch.release()  # deferred: the slot stays held by this process
            slots.append(batch.slot)
        report(pending=slots)
        while True:
            time.sleep(60)
    elif mode == "consume":
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            epoch = 0
            while True:
                seen = [[b.epoch, b.index, b.sample_ids.tolist()] for b in loader]
                if not seen:
                    break
                report(epoch=epoch, batches=seen)
                epoch += 1
        report(done=True)
    elif mode == "interrupt":
        # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a
        # background job of a non-interactive shell (a CI script's `cmd &`) starts with SIGINT
        # ignored: restore the handler an interactive trainer has.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            report(waiting=True)
            try:
                loader.next_batch()
                report(error="a batch arrived")
            except KeyboardInterrupt:
                held = len(loader.ring.held_slots(lane))  # what its lane page says it holds
                report(interrupted=True, held=held)
    elif mode == "scribble":
        scribble(name, directory, lane)
    elif mode == "storm":
        signal.signal(signal.SIGINT, interrupt_inside_client)
        sys.settrace(pause_at_every_client_line)
        storm(ringfeed.Loader(name, lane, runtime_dir=directory, timeout=5))
    elif mode == "torch-write":
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            images, _labels = loader.next_batch().torch()
            report(writing=True)
            images.add_(1.0)  # the mapping is read-only: this must fault
            report(error="the write went through")
    elif mode == "torch-copy":
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            batch = loader.next_batch()
            images, _labels = batch.torch(copy=True)
            images.add_(1.0)  # a copy in ordinary memory: allowed
            report(copy=float(images.flatten()[0]), ring=float(batch.images.flatten()[0]))
    else:
        raise SystemExit(f"unknown mode {mode}")


CLIENT_DIR = os.path.dirname(ringfeed.__file__)


def slot_seqs(ring: ringfeed.Ring) -> list[int]:
    """The ``seq`` of every slot of every lane, read from the (read-only) slot table."""
    layout = ring.layout
    return [
        int.from_bytes(ring._control[offset + 8 : offset + 16], "little")
        for offset in (
            layout.slot_entry_offset(lane, slot)
            for lane in range(layout.lane_count)
            for slot in range(layout.slots_per_lane)
        )
    ]


def scribble(name: str, directory: str, lane: int) -> None:
    """A hostile consumer of ``lane``: everything it can write is its lane page and doorbell,
    and it writes them as fast as it can (random bytes; every slot of its lane "released" with
    the seq it holds, or with seqs of other lanes' slots; huge counters), never releasing
    properly, until killed."""
    _sock, reply, fds = protocol.attach(socket_path(name, directory), lane)
    ring = ringfeed.Ring.from_fd(fds.ring)
    slots = ring.layout.slots_per_lane
    page = mmap.mmap(fds.lane, os.fstat(fds.lane).st_size, mmap.MAP_SHARED)
    rng = random.Random(lane)
    rounds = 0
    while True:
        if rounds % 64 == 0:
            seqs = slot_seqs(ring)  # fresh ones: the producer moves on
        if rounds % 2:
            page[:] = rng.randbytes(len(page))
        else:
            for slot in range(slots):
                own = seqs[lane * slots + slot]
                forged = own if rounds % 4 == 0 else rng.choice(seqs)
                page[72 + 16 * slot : 80 + 16 * slot] = forged.to_bytes(8, "little")
            page[16:48] = rng.randbytes(32)  # huge counters
        for _ in range(8):
            try:
                os.write(fds.doorbell, rng.randrange(1, 1 << 63).to_bytes(8, "little"))
            except BlockingIOError:
                break  # the counter is saturated
        if rounds == 0:
            report(ready=True, lane_page_bytes=reply.get("lane_page_bytes"))
        rounds += 1


def interrupt_inside_client(signum: int, frame: Optional[FrameType]) -> None:
    """SIGINT raises KeyboardInterrupt, as Python's own handler does, while the client's code
    runs (where the hazard is); elsewhere (this script's own bookkeeping) it is ignored, so
    that the storm cannot break the script itself."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(CLIENT_DIR):
            raise KeyboardInterrupt
        frame = frame.f_back if frame.f_code.co_name != "storm" else None


def pause_at_every_client_line(frame: FrameType, event: str, arg: object) -> Any:
    """A tracer that spends ~20 µs on every line of the client's code, so that a signal is
    about as likely to arrive at any one line of take and release as at any other."""
    if not frame.f_code.co_filename.startswith(CLIENT_DIR):
        return None

    def on_line(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            until = time.perf_counter() + 20e-6
            while time.perf_counter() < until:
                pass
        return on_line

    return on_line


def storm(loader: ringfeed.Loader) -> None:
    """Iterate, releasing each batch, until told to stop, swallowing every KeyboardInterrupt
    wherever it lands (one may also hit the handler of the previous one: the loops nest)."""
    counts = {"cycles": 0, "interrupts": 0, "stuck": 0}

    def told_to_stop() -> bool:
        return bool(select.select([sys.stdin], [], [], 0)[0])

    def cycle_until_told() -> None:
        if not counts.get("announced"):  # inside the loops: the storm starts on this line
            counts["announced"] = 1
            report(ready=True)
        while not told_to_stop():
            try:
                for batch in loader:
                    batch.release()
                    counts["cycles"] += 1
                    if told_to_stop():
                        return
            except KeyboardInterrupt:
                counts["interrupts"] += 1
            except ringfeed.RingTimeout:  # every slot of the lane leaked
                counts["stuck"] = 1
                return

    while True:
        try:
            cycle_until_told()
            break
        except KeyboardInterrupt:
            counts["interrupts"] += 1
    # The storm is over: one more ordinary step, then compare the ring with the loader.
    try:
        next(iter(loader), None)
        next(iter(loader), None)
    except ringfeed.RingTimeout:
        counts["stuck"] = 1
    held = len(loader.ring.held_slots(loader.lane))  # what its lane page says it holds
    del counts["announced"]
    report(held_in_ring=held, tracked=len(loader._held), **counts)
    loader.close()


if __name__ == "__main__":
    main()
