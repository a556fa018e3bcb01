"""A consumer process for the multi-process tests: ``python consumer_proc.py MODE NAME DIR LANE``.

Modes: ``hold N`` takes N batches, reports them and sleeps holding them until killed;
``consume`` reads every epoch to the end of the stream and reports each batch;
``interrupt`` blocks waiting for a batch, expects Ctrl-C, and reports the lane's held slots;
``hold-fenced N`` takes N batches, releases each behind a device fence that never completes,
reports the slots and sleeps until killed; ``torch-write`` writes in place through
``batch.torch()``, which must kill it with SIGSEGV.
Reports are JSON lines on stdout.
"""

from __future__ import annotations

import json
import signal
import sys
import time

import ringfeed
from ringfeed.layout import HELD


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
            batch.release()  # deferred: the slot stays HELD by this process
            slots.append(batch.slot)
        report(pending=slots)
        while True:
            time.sleep(60)
    elif mode == "consume":
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            epoch = 0
            while True:
                batches = [[b.epoch, b.index, b.sample_ids.tolist()] for b in loader]
                if not batches:
                    break
                report(epoch=epoch, batches=batches)
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
                ring = loader.ring
                slots = range(ring.layout.slots_per_lane)
                held = sum(ring.slot_state(lane, slot) == HELD for slot in slots)
                report(interrupted=True, held=held)
    elif mode == "torch-write":
        with ringfeed.Loader(name, lane, runtime_dir=directory) as loader:
            images, _labels = loader.next_batch().torch()
            report(writing=True)
            images.add_(1.0)  # the mapping is read-only: this must fault
            report(error="the write went through")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
