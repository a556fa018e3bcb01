"""The one consumer loop every loader in the comparison is timed with.

A loader is reduced to a function that opens one epoch (an iterable of batches); the loop runs
warm-up epochs untimed, then times the rest from the first batch request of the first timed
epoch until the last batch has been touched (and, in trainer mode, "computed" on). A batch is
touched the way a trainer touches it before handing it to the GPU: one element of the images
and one label are read, nothing is copied.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

Touch = Callable[[Any], int]
"""Reads one element of a batch and returns how many samples it holds."""

Pids = Callable[[], Iterable[int]]
"""The processes doing a loader's work (asked when the timed epochs start and end)."""

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Timing:
    """What one timed run of one loader measured."""

    images: int
    seconds: float
    waited_s: float
    startup_s: float
    cpu_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        """Images delivered per second of wall time."""
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_image(self) -> float:
        """CPU time (all threads of the trainer and the loader's processes) per image."""
        return self.cpu_s * 1000 / self.images if self.images else 0.0

    @property
    def wait_share(self) -> float:
        """Share of the timed wall time spent blocked waiting for the next batch."""
        return self.waited_s / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class Workload:
    """How much to consume and how the simulated trainer behaves."""

    warmup_epochs: int
    timed_epochs: int
    batches_per_epoch: int
    step_s: float = 0.0
    step_busy: bool = True


def step(work: Workload) -> None:
    """The simulated trainer step: a busy-wait that occupies a core (a Python loop launching
    kernels) or a sleep (a trainer blocked on its GPU)."""
    if work.step_s <= 0:
        return
    if not work.step_busy:
        time.sleep(work.step_s)
        return
    end = time.perf_counter() + work.step_s
    while time.perf_counter() < end:
        pass


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far; a process that
    has exited counts as 0, so ask while they run."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICKS


def consume(
    open_epoch: Callable[[], Iterable[Any]],
    touch: Touch,
    work: Workload,
    started: float,
    loader_pids: Pids = lambda: (),
) -> Timing:
    """Runs ``work`` over the epochs ``open_epoch`` yields; ``started`` is when the loader was
    created (``time.perf_counter()``), for the start-up figure (never part of the rate).
    CPU time is that of this process plus ``loader_pids()`` over the timed epochs."""
    startup_s = -1.0
    for _ in range(work.warmup_epochs):
        for batch in _epoch(open_epoch, work.batches_per_epoch):
            if startup_s < 0:
                startup_s = time.perf_counter() - started
            touch(batch)
            step(work)
    images = 0
    waited = 0.0
    pids = [os.getpid(), *loader_pids()]
    cpu_begin = cpu_seconds(pids)
    begin = time.perf_counter()
    for _ in range(work.timed_epochs):
        asked = time.perf_counter()
        for batch in _epoch(open_epoch, work.batches_per_epoch):
            got = time.perf_counter()
            waited += got - asked
            if startup_s < 0:
                startup_s = got - started
            images += touch(batch)
            step(work)
            asked = time.perf_counter()
    seconds = time.perf_counter() - begin
    cpu_s = cpu_seconds(pids) - cpu_begin
    return Timing(images, seconds, waited, startup_s, cpu_s)


def _epoch(open_epoch: Callable[[], Iterable[Any]], batches: int) -> Iterable[Any]:
    """One whole epoch of the loader, which must hold exactly ``batches`` full batches."""
    count = 0
    for batch in open_epoch():
        count += 1
        yield batch
    if count != batches:
        raise RuntimeError(f"the loader's epoch held {count} batches, expected {batches}")
