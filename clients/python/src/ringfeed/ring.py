"""A mapped ring: validation before mapping, then the consumer side of the slot protocol (§4, §6).

Brief overview: :meth:`Ring.from_fd` checks seals and size, validates the header and tensor
table with :mod:`ringfeed.layout`, and only then maps the control region read-write and the
data region read-only. The live tables are read and written through ctypes structures laid
over the control mapping: plain aligned 32/64-bit loads and stores, which on x86-64 carry the
acquire/release ordering §6 asks for. :meth:`Ring.take` and :meth:`Ring.release` are the two
halves of the consumer protocol; :class:`ringfeed.Loader` adds waiting, liveness and epochs.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time
from typing import Optional

import numpy as np

from . import _futex
from .errors import FormatError
from .layout import (
    CONSUMER_ENTRY_BYTES,
    FREE,
    HEADER_BYTES,
    HELD,
    LANE_ENTRY_BYTES,
    LAST_ERROR_BYTES,
    OFF_HEARTBEAT,
    OFF_LAST_ERROR,
    OFF_PRODUCER_STATE,
    OFF_RELEASE_ANY,
    READY,
    SLOT_ENTRY_BYTES,
    TENSOR_ENTRY_BYTES,
    RingLayout,
    parse_header,
    parse_tensor_table,
    tensor_table_count,
)

_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class _LaneEntry(ctypes.LittleEndianStructure):
    _fields_ = (
        ("publish_seq", _u32),
        ("release_seq", _u32),
        ("consumer_pid", _u32),
        ("stream", _u32),
        ("next_seq", _u64),
        ("published", _u64),
        ("released", _u64),
        ("consumer_wait_ns", _u64),
        ("producer_wait_ns", _u64),
        ("epoch", _u64),
        ("index", _u64),
        ("plan_epoch", _u64),
        ("plan_batches", _u64),
        ("plan_kept", _u64),
        ("plan_pruned", _u64),
        ("rank", _u32),  # 1.3: the global rank this lane serves (valid when world_size > 0)
        ("_reserved_108", _u32),
        ("rank_samples", _u64),  # 1.3: distinct samples this rank gets per full epoch
    )


class _SlotEntry(ctypes.LittleEndianStructure):
    _fields_ = (
        ("state", _u32),
        ("holder_pid", _u32),
        ("seq", _u64),
        ("epoch", _u64),
        ("index", _u64),
        ("count", _u32),
        ("flags", _u32),
        ("published_mono_ns", _u64),
        ("holder_token", _u64),
    )


class _ConsumerEntry(ctypes.LittleEndianStructure):
    _fields_ = (
        ("pid", _u32),
        ("lane", _u32),
        ("attach_unix_ns", _u64),
        ("heartbeat_mono_ns", _u64),
        ("taken", _u64),
    )


# The structures cover each entry's fields, not its trailing reserved bytes.
assert ctypes.sizeof(_LaneEntry) <= LANE_ENTRY_BYTES
assert ctypes.sizeof(_SlotEntry) <= SLOT_ENTRY_BYTES
assert ctypes.sizeof(_ConsumerEntry) <= CONSUMER_ENTRY_BYTES


class TakenSlot:
    """What :meth:`Ring.take` read from the slot it took: the batch's identity, and the
    holder token written with the take (a release proves ownership with ``seq`` and it)."""

    __slots__ = ("count", "epoch", "flags", "index", "seq", "slot", "token")

    def __init__(
        self, slot: int, seq: int, epoch: int, index: int, count: int, flags: int, token: int = 0
    ):
        """Record the fields of slot ``slot``."""
        self.slot = slot
        self.seq = seq
        self.epoch = epoch
        self.index = index
        self.count = count
        self.flags = flags
        self.token = token


def _check_seals(fd: int) -> None:
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError as err:
        raise FormatError("seals", f"cannot read the memfd's seals ({err})") from None
    if not seals & _F_SEAL_SHRINK:
        raise FormatError("seals", "the memfd lacks F_SEAL_SHRINK (it could shrink under us)")


def read_layout(fd: int) -> RingLayout:
    """Read and validate the header and tensor table of the ring behind ``fd`` (§5.6)."""
    st_size = os.fstat(fd).st_size
    header = os.pread(fd, HEADER_BYTES, 0)
    layout = parse_header(header, st_size)
    count = tensor_table_count(header)
    table = os.pread(fd, count * TENSOR_ENTRY_BYTES, layout.tensor_table_offset)
    return parse_tensor_table(layout, table, count)


class Ring:
    """A validated, mapped ring. Build it with :meth:`from_fd` or :meth:`from_path`.

    The file descriptor is not kept: the two mappings hold the memory. Numpy views handed out
    by :meth:`slot_arrays` keep the data mapping alive for as long as they exist.
    """

    def __init__(self, layout: RingLayout, control: mmap.mmap, data: mmap.mmap) -> None:
        """Wrap already validated mappings; use :meth:`from_fd` instead."""
        self.layout = layout
        self._control = control
        self._data = data
        self._producer_state = _u32.from_buffer(control, OFF_PRODUCER_STATE)
        self._heartbeat = _u64.from_buffer(control, OFF_HEARTBEAT)
        self._release_any = _u32.from_buffer(control, OFF_RELEASE_ANY)
        self._lanes = [
            _LaneEntry.from_buffer(control, layout.lane_entry_offset(lane))
            for lane in range(layout.lane_count)
        ]
        self._consumers = [
            _ConsumerEntry.from_buffer(control, layout.consumer_entry_offset(lane))
            for lane in range(layout.lane_count)
        ]
        self._slots = [
            [
                _SlotEntry.from_buffer(control, layout.slot_entry_offset(lane, slot))
                for slot in range(layout.slots_per_lane)
            ]
            for lane in range(layout.lane_count)
        ]
        self._arrays: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.framework_cache: dict[tuple[str, int, int], dict[str, object]] = {}
        """Per-slot tensors of other frameworks (torch), built once from :meth:`slot_arrays`."""
        self._data_array = np.frombuffer(data, dtype=np.uint8)

    @classmethod
    def from_fd(cls, fd: int, *, generation: Optional[int] = None, sealed: bool = True) -> Ring:
        """Validate and map the ring behind ``fd`` (which stays owned by the caller).

        ``sealed`` demands ``F_SEAL_SHRINK`` as §4 recommends; ``generation``, when given, must
        equal the header's (the attach reply's value). Raises :class:`FormatError` on any
        violation, before any view of the memory exists.
        """
        if sealed:
            _check_seals(fd)
        layout = read_layout(fd)
        if generation is not None and generation != layout.generation:
            raise FormatError(
                "generation", f"header has {layout.generation}, attach reply said {generation}"
            )
        if layout.world_size:
            # §5.1 (1.3): a known world size covers every lane's rank.
            first_rank = struct.unpack("<I", os.pread(fd, 4, layout.lane_table_offset + 104))[0]
            if first_rank + layout.lane_count > layout.world_size:
                raise FormatError(
                    "world_size",
                    f"{layout.world_size}, but the lanes serve ranks {first_rank}.."
                    f" (lane_count {layout.lane_count}) beyond it",
                )
        control = mmap.mmap(
            fd,
            layout.data_offset,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=0,
        )
        data = mmap.mmap(
            fd,
            layout.file_bytes - layout.data_offset,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ,
            offset=layout.data_offset,
        )
        return cls(layout, control, data)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, sealed: bool = False) -> Ring:
        """Open a ring file (a test fixture, or ``/proc/PID/fd/N`` of a producer) and map it."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            return cls.from_fd(fd, sealed=sealed)
        finally:
            os.close(fd)

    # ----- producer-owned state -------------------------------------------------------------

    @property
    def producer_state(self) -> int:
        """Current ``producer_state`` (0 STARTING … 4 FAILED)."""
        return int(self._producer_state.value)

    @property
    def heartbeat_mono_ns(self) -> int:
        """The producer's last heartbeat, ``CLOCK_MONOTONIC`` ns."""
        return int(self._heartbeat.value)

    @property
    def last_error(self) -> str:
        """The producer's last skip or failure reason (may be empty)."""
        raw = self._control[OFF_LAST_ERROR : OFF_LAST_ERROR + LAST_ERROR_BYTES]
        return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")

    def counters(self) -> dict[str, int]:
        """The header's global counters (§5.1)."""
        view = memoryview(self._control)
        names = ("samples_ok", "samples_skipped", "producer_wait_ns", "batches_published")
        values = np.frombuffer(view[160:192], dtype="<u8")
        return {name: int(value) for name, value in zip(names, values)}

    def lane_stats(self, lane: int) -> dict[str, int]:
        """A snapshot of lane ``lane``'s table entry (§5.3)."""
        entry = self._lanes[lane]
        return {
            name: int(getattr(entry, name))
            for name, _ in _LaneEntry._fields_
            if not name.startswith("_")
        }

    def lane_plan(self, lane: int) -> Optional[dict[str, int]]:
        """Lane ``lane``'s announced epoch plan (§5.3 ``plan_*``): ``{"epoch", "batches",
        "kept", "pruned"}``, or ``None`` before the first one (or without selection)."""
        entry = self._lanes[lane]
        tagged = int(entry.plan_epoch)  # read first: the producer stores it last (release)
        if tagged == 0:
            return None
        plan = {
            "epoch": tagged - 1,
            "batches": int(entry.plan_batches),
            "kept": int(entry.plan_kept),
            "pruned": int(entry.plan_pruned),
        }
        # A new announcement while reading would mix two epochs: read the tag again.
        return plan if int(entry.plan_epoch) == tagged else None

    def lane_rank(self, lane: int) -> Optional[int]:
        """The global rank lane ``lane`` serves (1.3, §5.3), or ``None`` when the producer
        does not say (``world_size`` 0: a producer before 1.3)."""
        if self.layout.world_size == 0:
            return None
        return int(self._lanes[lane].rank)

    def publish_seq(self, lane: int) -> int:
        """Load ``publish_seq`` of ``lane`` (the value to pass to :meth:`wait`)."""
        return int(self._lanes[lane].publish_seq)

    def wait(self, lane: int, seen: int, timeout_s: float) -> None:
        """Futex-wait until ``publish_seq`` of ``lane`` moves from ``seen`` (or the timeout)."""
        _futex.futex_wait(ctypes.addressof(self._lanes[lane]), seen, timeout_s)

    def slot_state(self, lane: int, slot: int) -> int:
        """Raw ``state`` of a slot (for inspection and tests)."""
        return int(self._slots[lane][slot].state)

    # ----- consumer side of the protocol ------------------------------------------------------

    def next_ready(self, lane: int) -> Optional[tuple[int, int]]:
        """``(slot, seq)`` of the ``READY`` slot of ``lane`` with the smallest ``seq`` (§6), the
        one :meth:`take` takes next, or None. Raises :class:`FormatError` on a slot state
        outside 0–3."""
        best: Optional[tuple[int, int]] = None
        for index, entry in enumerate(self._slots[lane]):
            state = entry.state
            if state == READY:
                seq = entry.seq  # read after state == READY: published before it (§6 step 3)
                if best is None or seq < best[1]:
                    best = (index, seq)
            elif state > HELD:
                raise FormatError(f"lane {lane} slot {index} state", f"{state} not in 0..3")
        return best

    def take_slot(self, lane: int, slot: int, pid: int, token: int) -> TakenSlot:
        """Take ``slot`` (found ``READY`` by :meth:`next_ready`): store ``holder_pid`` and
        ``holder_token``, then ``state = HELD``, then read the batch's fields."""
        entry = self._slots[lane][slot]
        entry.holder_pid = pid
        entry.holder_token = token
        entry.state = HELD
        return TakenSlot(slot, entry.seq, entry.epoch, entry.index, entry.count, entry.flags, token)

    def take(self, lane: int, pid: int, token: int = 0) -> Optional[TakenSlot]:
        """Take the ``READY`` slot of ``lane`` with the smallest ``seq`` (§6), or return None.

        Raises :class:`FormatError` on a slot state outside 0–3.
        """
        found = self.next_ready(lane)
        if found is None:
            return None
        try:
            return self.take_slot(lane, found[0], pid, token)
        except BaseException:  # Ctrl-C right after the store: leave no half-taken slot
            self.untake(lane, found[0])
            raise

    def peek(self, lane: int) -> Optional[TakenSlot]:
        """The ``READY`` slot of ``lane`` that :meth:`take` would take now, without taking it."""
        best: Optional[TakenSlot] = None
        for index, entry in enumerate(self._slots[lane]):
            if entry.state == READY and (best is None or entry.seq < best.seq):
                best = TakenSlot(
                    index, entry.seq, entry.epoch, entry.index, entry.count, entry.flags
                )
        return best

    def untake(self, lane: int, slot: int) -> None:
        """Put a slot taken by this process back to ``READY`` (an interrupted take)."""
        entry = self._slots[lane][slot]
        entry.holder_token = 0
        entry.holder_pid = 0
        entry.state = READY

    def held_by(self, lane: int, slot: int, token: int, seq: Optional[int] = None) -> bool:
        """Whether ``slot`` is ``HELD`` with ``holder_token == token`` (and, if given, still
        carries batch ``seq``): the proof of ownership a release needs (§6)."""
        entry = self._slots[lane][slot]
        return (
            entry.state == HELD
            and entry.holder_token == token
            and (seq is None or entry.seq == seq)
        )

    def release(self, lane: int, slot: int, seq: Optional[int], token: int) -> bool:
        """Give a held slot back to the producer and wake it (§6 "Consumer releases"), if it
        is still ours (:meth:`held_by`); returns whether it was released. A slot the producer
        took back (it declared this connection dead) is left alone."""
        if not self.held_by(lane, slot, token, seq):
            return False
        entry = self._slots[lane][slot]
        entry.holder_token = 0
        entry.holder_pid = 0
        entry.state = FREE  # last store to the slot: the producer may rewrite it from now on
        lane_entry = self._lanes[lane]
        lane_entry.released += 1
        lane_entry.release_seq = (lane_entry.release_seq + 1) & 0xFFFFFFFF
        self._release_any.value = (self._release_any.value + 1) & 0xFFFFFFFF
        _futex.futex_wake(ctypes.addressof(lane_entry) + 4)  # release_seq
        _futex.futex_wake(ctypes.addressof(self._release_any))
        return True

    def slots_held_by(self, lane: int, token: int) -> list[int]:
        """The slots of ``lane`` that are ``HELD`` with ``holder_token == token``."""
        return [
            index
            for index, entry in enumerate(self._slots[lane])
            if entry.state == HELD and entry.holder_token == token
        ]

    def note_consumer(self, lane: int, taken: int = 0, waited_ns: int = 0) -> None:
        """Refresh the consumer heartbeat of ``lane``; add ``taken`` batches and wait time."""
        entry = self._consumers[lane]
        entry.heartbeat_mono_ns = time.monotonic_ns()
        if taken:
            entry.taken += taken
        if waited_ns:
            self._lanes[lane].consumer_wait_ns += waited_ns

    # ----- data -------------------------------------------------------------------------------

    def slot_arrays(self, lane: int, slot: int) -> dict[str, np.ndarray]:
        """Read-only numpy arrays of every tensor of ``(lane, slot)``, viewing the mapping.

        The arrays are cached per slot; callers that hand them out should pass ``.view()``s so
        that nobody can reshape the cached objects in place.
        """
        key = (lane, slot)
        arrays = self._arrays.get(key)
        if arrays is None:
            base = self.layout.slot_data_offset(lane, slot) - self.layout.data_offset
            arrays = {
                spec.name: np.ndarray(
                    spec.shape, dtype=spec.dtype, buffer=self._data, offset=base + spec.offset
                )
                for spec in self.layout.tensors
            }
            self._arrays[key] = arrays
        return arrays

    @property
    def data_address(self) -> int:
        """Virtual address of the read-only data mapping (for ``cudaHostRegister``)."""
        return int(self._data_array.ctypes.data)

    @property
    def data_bytes(self) -> int:
        """Length of the data mapping in bytes."""
        return len(self._data)

    def close(self) -> None:
        """Drop this ring's references; the memory goes once no batch view refers to it."""
        self._arrays.clear()
        self.framework_cache.clear()
        self._lanes = []
        self._consumers = []
        self._slots = []
