"""A mapped ring: validation before mapping, then the consumer side of the slot protocol (§4, §6).

Brief overview: :meth:`Ring.from_fd` checks seals and size, validates the header and tensor
table with :mod:`ringfeed.layout`, and only then maps the whole ring **read-only** (format 2.0:
every ring byte is the producer's; the control region and the data region are two read-only
mappings). The live tables are read through ctypes structures laid over the control mapping:
plain aligned 32/64-bit loads, which on x86-64 carry the acquire ordering §6 asks for.
:meth:`Ring.attach` adds the consumer's own :class:`ringfeed.lane.LanePage`, the only memory it
writes: :meth:`Ring.take_slot` and :meth:`Ring.release` record there which batch of each slot
it took and gave back. :class:`ringfeed.Loader` adds waiting, liveness and epochs.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from typing import Optional

import numpy as np

from . import _futex
from .errors import FormatError, RingfeedError
from .lane import LanePage
from .layout import (
    HEADER_BYTES,
    LANE_ENTRY_BYTES,
    LAST_ERROR_BYTES,
    OFF_HEARTBEAT,
    OFF_LAST_ERROR,
    OFF_PRODUCER_STATE,
    READY,
    SLOT_ENTRY_BYTES,
    SLOT_STATES,
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
        ("_reserved_4", _u32),  # 2.0 (release_seq in 1.x)
        ("consumer_pid", _u32),
        ("stream", _u32),
        ("next_seq", _u64),
        ("published", _u64),
        ("released", _u64),  # 2.0: the producer's copy of the consumers' counts (heartbeat)
        ("consumer_wait_ns", _u64),  # 2.0: likewise
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
        ("_reserved_4", _u32),  # 2.0 (holder_pid in 1.x)
        ("seq", _u64),
        ("epoch", _u64),
        ("index", _u64),
        ("count", _u32),
        ("flags", _u32),
        ("published_mono_ns", _u64),
    )


# The structures cover each entry's fields, not its trailing reserved bytes.
assert ctypes.sizeof(_LaneEntry) <= LANE_ENTRY_BYTES
assert ctypes.sizeof(_SlotEntry) <= SLOT_ENTRY_BYTES


class TakenSlot:
    """What :meth:`Ring.take` read from the slot it took: the batch's identity (a release
    names the batch by ``slot`` and ``seq``)."""

    __slots__ = ("count", "epoch", "flags", "index", "seq", "slot")

    def __init__(self, slot: int, seq: int, epoch: int, index: int, count: int, flags: int):
        """Record the fields of slot ``slot``."""
        self.slot = slot
        self.seq = seq
        self.epoch = epoch
        self.index = index
        self.count = count
        self.flags = flags


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


def _address(memory: mmap.mmap) -> tuple[np.ndarray, int]:
    """A numpy view of a (read-only) mapping and its address: ctypes cannot lay structures
    over a read-only buffer, so they are placed at the address, and the view keeps the
    mapping from being closed under them."""
    view = np.frombuffer(memory, dtype=np.uint8)
    return view, int(view.ctypes.data)


class Ring:
    """A validated, read-only mapped ring. Build it with :meth:`from_fd`, :meth:`from_path` or,
    for a consumer with its lane page, :meth:`attach`.

    The file descriptors are not kept: the mappings hold the memory. Numpy views handed out
    by :meth:`slot_arrays` keep the data mapping alive for as long as they exist.
    """

    def __init__(self, layout: RingLayout, control: mmap.mmap, data: mmap.mmap) -> None:
        """Wrap already validated mappings; use :meth:`from_fd` instead."""
        self.layout = layout
        self._control = control
        self._data = data
        self._control_array, base = _address(control)
        self._producer_state = _u32.from_address(base + OFF_PRODUCER_STATE)
        self._heartbeat = _u64.from_address(base + OFF_HEARTBEAT)
        self._lanes = [
            _LaneEntry.from_address(base + layout.lane_entry_offset(lane))
            for lane in range(layout.lane_count)
        ]
        self._slots = [
            [
                _SlotEntry.from_address(base + layout.slot_entry_offset(lane, slot))
                for slot in range(layout.slots_per_lane)
            ]
            for lane in range(layout.lane_count)
        ]
        self._page: Optional[LanePage] = None
        self._arrays: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self.framework_cache: dict[tuple[str, int, int], dict[str, object]] = {}
        """Per-slot tensors of other frameworks (torch), built once from :meth:`slot_arrays`."""
        self._data_array = np.frombuffer(data, dtype=np.uint8)

    @classmethod
    def from_fd(cls, fd: int, *, generation: Optional[int] = None, sealed: bool = True) -> Ring:
        """Validate and map the ring behind ``fd`` (which stays owned by the caller) read-only.

        ``sealed`` demands ``F_SEAL_SHRINK`` as §4 recommends; ``generation``, when given, must
        equal the header's (the attach reply's value). Raises :class:`FormatError` on any
        violation, before any view of the memory exists.
        """
        return cls._map(fd, cls._checked_layout(fd, generation=generation, sealed=sealed))

    @staticmethod
    def _checked_layout(fd: int, *, generation: Optional[int], sealed: bool) -> RingLayout:
        """Everything :meth:`from_fd` checks before mapping, read with ``pread``."""
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
        return layout

    @classmethod
    def _map(cls, fd: int, layout: RingLayout) -> Ring:
        """Map a checked ring read-only: the control region and the data region."""
        control = mmap.mmap(
            fd, layout.data_offset, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=0
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
    def attach(
        cls,
        ring_fd: int,
        page_fd: int,
        doorbell_fd: int,
        *,
        lane: int,
        lane_page_bytes: object,
        generation: Optional[int] = None,
        sealed: bool = True,
    ) -> Ring:
        """A consumer's ring: :meth:`from_fd` of the (read-only) ring descriptor, then the lane
        page of ``lane`` validated against the ring and the reply's ``lane_page_bytes`` and
        mapped read-write (:meth:`ringfeed.lane.LanePage.from_fds`). The three descriptors
        stay the caller's. Everything is checked before anything is mapped."""
        layout = cls._checked_layout(ring_fd, generation=generation, sealed=sealed)
        if not 0 <= lane < layout.lane_count:
            raise FormatError("lane", f"{lane} not below lane_count {layout.lane_count}")
        _check_seals(page_fd)  # always a memfd: one that could shrink could SIGBUS our stores
        page = LanePage.from_fds(
            page_fd,
            doorbell_fd,
            lane=lane,
            slots=layout.slots_per_lane,
            reply_bytes=lane_page_bytes,
        )
        ring = cls._map(ring_fd, layout)
        ring._page = page
        return ring

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, sealed: bool = False) -> Ring:
        """Open a ring file (a test fixture, or ``/proc/PID/fd/N`` of a producer) read-only
        and map it."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
        """A snapshot of lane ``lane``'s table entry (§5.3). ``released`` and
        ``consumer_wait_ns`` are the producer's copies of the consumers' counts (2.0: copied
        at its heartbeat, ≤ 100 ms behind)."""
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
        """Futex-wait until ``publish_seq`` of ``lane`` moves from ``seen`` (or the timeout).
        A wait needs only read access to the word."""
        _futex.futex_wait(ctypes.addressof(self._lanes[lane]), seen, timeout_s)

    def slot_state(self, lane: int, slot: int) -> int:
        """Raw ``state`` of a slot (for inspection and tests)."""
        return int(self._slots[lane][slot].state)

    # ----- consumer side of the protocol ------------------------------------------------------

    @property
    def lane_page(self) -> Optional[LanePage]:
        """This consumer's lane page (``None`` for a ring mapped without an attach)."""
        return self._page

    def _page_of(self, lane: int) -> LanePage:
        page = self._page
        if page is None or page.lane != lane:
            raise RingfeedError(f"this ring holds no lane page of lane {lane} (attach to it)")
        return page

    def _takeable(self, lane: int, slot: int, entry: _SlotEntry) -> Optional[int]:
        """The ``seq`` of ``entry`` if it is a batch this consumer may take (``READY``, neither
        taken nor released by this attach), else None. Raises :class:`FormatError` on a state
        outside 0–2."""
        state = entry.state
        if state != READY:
            if state >= len(SLOT_STATES):
                raise FormatError(
                    f"lane {lane} slot {slot} state", f"{state} not in 0..{len(SLOT_STATES) - 1}"
                )
            return None
        seq = int(entry.seq)  # read after state == READY: published before it (§6 step 3)
        page = self._page
        if page is not None and seq in (page.taken_seq(slot), page.released_seq(slot)):
            return None
        # A slot released by this attach may have been claimed and rewritten between the two
        # loads: a seq read then is trusted only if the slot is (still, or again) READY.
        return seq if entry.state == READY and seq != 0 else None

    def next_ready(self, lane: int) -> Optional[tuple[int, int]]:
        """``(slot, seq)`` of the batch :meth:`take` takes next: the ``READY`` slot of ``lane``
        with the smallest ``seq`` that this attach has neither taken nor released (§6), or
        None. Raises :class:`FormatError` on a slot state outside 0–2."""
        best: Optional[tuple[int, int]] = None
        for index, entry in enumerate(self._slots[lane]):
            seq = self._takeable(lane, index, entry)
            if seq is not None and (best is None or seq < best[1]):
                best = (index, seq)
        return best

    def ready_count(self, lane: int) -> int:
        """How many batches of ``lane`` wait to be taken (as :meth:`next_ready` counts)."""
        return sum(
            self._takeable(lane, index, entry) is not None
            for index, entry in enumerate(self._slots[lane])
        )

    def take_slot(self, lane: int, slot: int, seq: int) -> TakenSlot:
        """Take batch ``seq`` of ``slot`` (found by :meth:`next_ready`): store ``taken_seq``
        in the lane page, then read the batch's fields (the producer does not rewrite a
        ``READY`` slot whose batch is not released)."""
        self._page_of(lane).take(slot, seq)
        entry = self._slots[lane][slot]
        return TakenSlot(slot, seq, entry.epoch, entry.index, entry.count, entry.flags)

    def take(self, lane: int) -> Optional[TakenSlot]:
        """Take the next batch of ``lane`` (:meth:`next_ready`), or return None.

        Raises :class:`FormatError` on a slot state outside 0–2.
        """
        found = self.next_ready(lane)
        if found is None:
            return None
        try:
            return self.take_slot(lane, *found)
        except BaseException:  # Ctrl-C right after the store: leave no half-taken slot
            self.untake(lane, found[0])
            raise

    def peek(self, lane: int) -> Optional[TakenSlot]:
        """The batch that :meth:`take` would take now, without taking it."""
        found = self.next_ready(lane)
        if found is None:
            return None
        entry = self._slots[lane][found[0]]
        return TakenSlot(found[0], found[1], entry.epoch, entry.index, entry.count, entry.flags)

    def untake(self, lane: int, slot: int) -> None:
        """Undo a take of ``slot`` by this attach (an interrupted take): ``taken_seq = 0``, so
        the batch is delivered next."""
        self._page_of(lane).untake(slot)

    def holds(self, lane: int, slot: int, seq: Optional[int] = None) -> bool:
        """Whether this attach holds ``slot`` (and, if given, batch ``seq`` in it): ``READY``,
        taken and not released according to the lane page."""
        page = self._page_of(lane)
        entry = self._slots[lane][slot]
        current = int(entry.seq)
        return (
            entry.state == READY
            and current != 0
            and page.taken_seq(slot) == current
            and page.released_seq(slot) != current
            and (seq is None or seq == current)
        )

    def release(self, lane: int, slot: int, seq: Optional[int] = None) -> bool:
        """Give a held slot back to the producer and ring its doorbell (§6 "Consumer
        releases"), if this attach holds it (:meth:`holds`); returns whether it was released."""
        if not self.holds(lane, slot, seq):
            return False
        current = int(self._slots[lane][slot].seq)
        self._page_of(lane).release(slot, current)  # last write: the producer may reuse it now
        return True

    def held_slots(self, lane: int) -> list[int]:
        """The slots of ``lane`` this attach holds (:meth:`holds`)."""
        return [slot for slot in range(self.layout.slots_per_lane) if self.holds(lane, slot)]

    def note_consumer(self, lane: int, waited_ns: int = 0) -> None:
        """Refresh this consumer's heartbeat in its lane page; add ``waited_ns`` of waiting."""
        self._page_of(lane).note(waited_ns)

    def consumer_counters(self, lane: int) -> dict[str, int]:
        """This attach's own counters from its lane page (``released``, ``consumer_wait_ns``,
        ``heartbeat_mono_ns``, ``taken``), exact and current."""
        return self._page_of(lane).counters()

    def close_lane(self) -> None:
        """The attach is over: close the lane page's doorbell. Later releases write into a
        page nobody reads."""
        if self._page is not None:
            self._page.close()

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
        self.close_lane()
        self._arrays.clear()
        self.framework_cache.clear()
        self._lanes = []
        self._slots = []
