"""The consumer's lane page and doorbell (format 2.0): the only memory a consumer writes.

Brief overview: an attach hands over three descriptors: the ring (read-only), this lane's page
and its doorbell (an eventfd). :meth:`LanePage.from_fds` validates the page with
:func:`ringfeed.layout.validate_lane_page` and maps it read-write; the slot protocol in
:mod:`ringfeed.ring` records in it which batch of each slot it took (``taken_seq``) and
released (``released_seq``), and rings the doorbell after a release so that a producer waiting
for a slot of this lane rescans. A new attach gets a new page: whatever an earlier attach (or a
process declared dead) writes into its own page, nobody reads any more.

Fork: a ``fork()``ed child shares the page's memory with its parent. Every write checks the
pid recorded when the page was mapped, and a child made by ``os.fork`` also gets its copies
of every live page turned read-only (``mprotect``), so that not even a stray ctypes store of
the child can release the parent's slots.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
import weakref
from typing import Optional

from .errors import RingfeedError
from .layout import LANE_HEADER_BYTES, LANE_SLOT_BYTES, validate_lane_page

_u64 = ctypes.c_uint64
_DOORBELL_RING = (1).to_bytes(8, "little")


class _PageHeader(ctypes.LittleEndianStructure):
    _fields_ = (
        ("magic", _u64),
        ("lane", ctypes.c_uint32),
        ("slots", ctypes.c_uint32),
        ("released", _u64),
        ("consumer_wait_ns", _u64),
        ("heartbeat_mono_ns", _u64),
        ("taken", _u64),
    )


class _PageSlot(ctypes.LittleEndianStructure):
    _fields_ = (("taken_seq", _u64), ("released_seq", _u64))


assert ctypes.sizeof(_PageHeader) <= LANE_HEADER_BYTES
assert ctypes.sizeof(_PageSlot) == LANE_SLOT_BYTES

# Every mapped page of this process, so that a fork()ed child can make its copies read-only.
_PAGES: weakref.WeakSet[LanePage] = weakref.WeakSet()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mprotect.restype = ctypes.c_int


def _after_fork_in_child() -> None:
    for page in list(_PAGES):
        page._seal_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LanePage:
    """This attach's lane page, mapped read-write, and its doorbell.

    Plain aligned 64-bit loads and stores through ctypes, which on x86-64 carry the
    acquire/release ordering the format asks for (a ``released_seq`` store is the release that
    hands a slot back). Writes from any process but the one that mapped the page raise
    :class:`RingfeedError`.
    """

    def __init__(self, lane: int, slots: int, memory: mmap.mmap, doorbell: int) -> None:
        """Wrap a validated mapping and a doorbell descriptor this object owns; use
        :meth:`from_fds` instead."""
        self.lane = lane
        self._memory = memory
        self._header = _PageHeader.from_buffer(memory, 0)
        self._slots = (_PageSlot * slots).from_buffer(memory, LANE_HEADER_BYTES)
        self._doorbell: Optional[int] = doorbell
        self._pid = os.getpid()
        _PAGES.add(self)

    @classmethod
    def from_fds(
        cls, page_fd: int, doorbell_fd: int, *, lane: int, slots: int, reply_bytes: object
    ) -> LanePage:
        """Validate the lane page behind ``page_fd`` (size, magic, lane, slots; see
        :func:`ringfeed.layout.validate_lane_page`) and map it read-write. Both descriptors
        stay the caller's: the doorbell is duplicated (close-on-exec)."""
        size = os.fstat(page_fd).st_size
        validate_lane_page(os.pread(page_fd, 16, 0), size, reply_bytes, lane, slots)
        memory = mmap.mmap(
            page_fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        return cls(lane, slots, memory, os.dup(doorbell_fd))

    # ----- reads ------------------------------------------------------------------------------

    def taken_seq(self, slot: int) -> int:
        """The ``seq`` of the batch this attach took last from ``slot`` (0: none)."""
        return int(self._slots[slot].taken_seq)

    def released_seq(self, slot: int) -> int:
        """The ``seq`` of the batch this attach released last from ``slot`` (0: none)."""
        return int(self._slots[slot].released_seq)

    def counters(self) -> dict[str, int]:
        """``released``, ``consumer_wait_ns``, ``heartbeat_mono_ns`` and ``taken`` since attach."""
        header = self._header
        return {
            "released": int(header.released),
            "consumer_wait_ns": int(header.consumer_wait_ns),
            "heartbeat_mono_ns": int(header.heartbeat_mono_ns),
            "taken": int(header.taken),
        }

    # ----- writes (this process only) ---------------------------------------------------------

    def _check_owner(self) -> None:
        if os.getpid() != self._pid:
            raise RingfeedError(
                f"the lane page of lane {self.lane} was inherited through fork() from pid"
                f" {self._pid}: pid {os.getpid()} may not take or release its batches"
            )

    def take(self, slot: int, seq: int) -> None:
        """Record batch ``seq`` of ``slot`` as taken (``taken_seq``, ``taken``, heartbeat)."""
        self._check_owner()
        self._slots[slot].taken_seq = seq
        header = self._header
        header.taken += 1
        header.heartbeat_mono_ns = time.monotonic_ns()

    def untake(self, slot: int) -> None:
        """Undo an interrupted take of ``slot``: the batch is delivered again."""
        self._check_owner()
        self._slots[slot].taken_seq = 0
        header = self._header
        header.taken -= 1

    def release(self, slot: int, seq: int) -> None:
        """Hand batch ``seq`` of ``slot`` back: store-release ``released_seq`` (from here on the
        producer may rewrite the slot), count it, then ring the doorbell."""
        self._check_owner()
        self._slots[slot].released_seq = seq
        header = self._header
        header.released += 1
        header.heartbeat_mono_ns = time.monotonic_ns()
        doorbell = self._doorbell
        if doorbell is not None:
            # EAGAIN: the counter is saturated, so the producer is woken already.
            with contextlib.suppress(BlockingIOError):
                os.write(doorbell, _DOORBELL_RING)

    def note(self, waited_ns: int = 0) -> None:
        """Refresh the heartbeat; add ``waited_ns`` to ``consumer_wait_ns``."""
        self._check_owner()
        header = self._header
        header.heartbeat_mono_ns = time.monotonic_ns()
        if waited_ns:
            header.consumer_wait_ns += waited_ns

    def close(self) -> None:
        """Close the doorbell (the attach is over). The mapping goes with the last reference;
        writes into it reach nobody."""
        doorbell, self._doorbell = self._doorbell, None
        if doorbell is not None:
            os.close(doorbell)  # this process's own descriptor (a dup), also in a child

    def _seal_inherited(self) -> None:
        """In a fork()ed child: make this copy of the parent's page read-only and forget the
        doorbell (the child's copy of the descriptor is closed)."""
        address = ctypes.addressof(self._header)
        _libc.mprotect(address, len(self._memory), mmap.PROT_READ)
        doorbell, self._doorbell = self._doorbell, None
        if doorbell is not None:
            os.close(doorbell)

    def __del__(self) -> None:
        if getattr(self, "_doorbell", None) is not None:
            self.close()
