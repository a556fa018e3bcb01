"""What :meth:`ringfeed.Loader.stats` returns: one consumer's starvation figures, typed.

Counts and durations are integers as the ring keeps them (nanoseconds, batches); the seconds
and the wait share are derived properties, so nothing is rounded twice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot of one loader's lane (durations since attach unless said otherwise).

    ``wait_share`` near 0 means the daemon keeps up; large means the trainer is starved and
    the daemon needs more workers.
    """

    #: Wall time since attach, in nanoseconds (at least 1).
    wall_ns: int
    #: Time this consumer spent blocked waiting for a batch since attach (its lane page's
    #: ``consumer_wait_ns``), in nanoseconds.
    wait_ns: int
    #: Time the daemon waited for a free slot in this lane (the lane's ``producer_wait_ns``,
    #: since the ring was created), in nanoseconds.
    producer_wait_ns: int
    #: Batches this loader has taken since attach.
    taken: int
    #: Batches this loader holds now (taken, not yet released).
    held: int
    #: Releases waiting for their device copies to finish (``pin=True`` / ``batch.cuda()``).
    pending_release: int
    #: Batches ready in the lane right now, waiting to be taken.
    ready: int
    #: Batches the daemon has published to this lane (the lane's counter).
    published: int
    #: Batches released in this lane by all its consumers (the lane's counter, which the
    #: daemon copies from the consumers' lane pages at its heartbeat: up to 100 ms behind).
    released: int

    @property
    def wall_s(self) -> float:
        """:attr:`wall_ns` in seconds."""
        return self.wall_ns / 1e9

    @property
    def wait_s(self) -> float:
        """:attr:`wait_ns` in seconds."""
        return self.wait_ns / 1e9

    @property
    def producer_wait_s(self) -> float:
        """:attr:`producer_wait_ns` in seconds."""
        return self.producer_wait_ns / 1e9

    @property
    def wait_share(self) -> float:
        """The fraction of wall time since attach spent waiting for a batch (0..1)."""
        return self.wait_ns / self.wall_ns
