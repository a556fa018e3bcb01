"""The ring format's static layout (2.0): constants, the parsed header and its validation (§5),
and the lane page, the only memory a consumer writes.

Brief overview: :func:`parse_header` turns the first 512 bytes of a ring into a
:class:`RingLayout` after checking every rule of §5.6 that the header alone decides;
:func:`parse_tensor_table` then reads and checks the tensor table;
:func:`validate_lane_page` checks the lane page an attach hands over. All are pure functions of
bytes, so a malformed ring or page is refused before any memory view exists.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from .errors import FormatError

MAGIC = b"RINGFEED"
VERSION_MAJOR = 2
HEADER_BYTES = 512
PAGE = 4096
TENSOR_ENTRY_BYTES = 64
LANE_ENTRY_BYTES = 128
SLOT_ENTRY_BYTES = 64
CONSUMER_ENTRY_BYTES = 64
MAX_TENSORS = 16
MAX_RANK = 4

# producer_state values (§5.1)
STARTING, SERVING, FINISHED, STOPPED, FAILED = 0, 1, 2, 3, 4
PRODUCER_STATES = ("STARTING", "SERVING", "FINISHED", "STOPPED", "FAILED")

# slot states (§5.4). 2.0 has no HELD: whether a READY slot is held is the lane page's record.
FREE, WRITING, READY = 0, 1, 2
SLOT_STATES = ("FREE", "WRITING", "READY")

# slot flags (§5.4) and header flags (§5.1)
SLOT_LAST_OF_EPOCH = 1
SLOT_REDELIVERED = 2
FLAG_DROP_LAST = 1
FLAG_NHWC = 2
FLAG_SELECTION = 4
FLAG_ON_DEMAND = 8  # since 1.3

# Header field byte offsets that are read or written while the ring is live.
OFF_PRODUCER_STATE = 44
OFF_HEARTBEAT = 56
OFF_LAST_ERROR = 192
LAST_ERROR_BYTES = 256

# The lane page (2.0): one per attach, passed read-write to that lane's consumer only.
LANE_MAGIC = b"RFLANE\0\0"
LANE_HEADER_BYTES = 64  # magic, lane, slots, four counters, reserved
LANE_SLOT_BYTES = 16  # per slot: taken_seq, released_seq
OFF_LANE_RELEASED = 16
OFF_LANE_CONSUMER_WAIT_NS = 24
OFF_LANE_HEARTBEAT = 32
OFF_LANE_TAKEN = 40

# dtype code → (name, little-endian numpy dtype of the stored bits, bytes per element).
# bf16 has no numpy dtype; its raw bits are exposed as uint16 (see Batch docs).
DTYPES: dict[int, tuple[str, str, int]] = {
    1: ("u8", "|u1", 1),
    2: ("i32", "<i4", 4),
    3: ("i64", "<i8", 8),
    4: ("f16", "<f2", 2),
    5: ("bf16", "<u2", 2),
    6: ("f32", "<f4", 4),
    7: ("u16", "<u2", 2),
}

_HEADER = struct.Struct(
    "<8sHHIQQQIIQQIIQQIIIIIIIIQQQQII"  # magic .. reserved (152), world_size (offsets 0..159)
)
_MEAN_STD = struct.Struct("<4f4f")  # offset 448
_TENSOR = struct.Struct("<16sII4QQ")


class TensorSpec(NamedTuple):
    """One entry of the tensor table (§5.2): where a tensor lies inside every slot."""

    name: str
    dtype_code: int
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def dtype_name(self) -> str:
        """The format's name of the dtype (``"u8"``, ``"bf16"``, ``"f32"``…)."""
        return DTYPES[self.dtype_code][0]


class RingLayout(NamedTuple):
    """The validated, immutable part of a ring header (§5.1) plus its tensor table."""

    version_minor: int
    header_bytes: int
    file_bytes: int
    generation: int
    producer_pid: int
    producer_start_unix_ns: int
    lane_count: int
    slots_per_lane: int
    slot_stride: int
    data_offset: int
    tensor_table_offset: int
    lane_table_offset: int
    slot_table_offset: int
    consumer_table_offset: int
    consumer_capacity: int
    batch_size: int
    flags: int
    batches_per_epoch: int
    epochs: int
    seed: int
    samples_per_epoch: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    tensors: tuple[TensorSpec, ...]
    #: Ranks in the whole job (1.3, header offset 156); 0 = unknown (a producer before 1.3).
    world_size: int = 0

    @property
    def drop_last(self) -> bool:
        """True when the producer drops the last partial batch of an epoch instead of padding."""
        return bool(self.flags & FLAG_DROP_LAST)

    @property
    def nhwc(self) -> bool:
        """True when images are laid out ``[B, H, W, C]`` rather than ``[B, C, H, W]``."""
        return bool(self.flags & FLAG_NHWC)

    @property
    def selection(self) -> bool:
        """True when the producer selects samples per epoch (``[selection]``): each epoch's
        length is the lane's announced plan, at most ``batches_per_epoch``."""
        return bool(self.flags & FLAG_SELECTION)

    @property
    def on_demand(self) -> bool:
        """True for an on-demand (evaluation) ring (1.3): a lane produces only the passes its
        consumer asks for, each one the same batches in the same order."""
        return bool(self.flags & FLAG_ON_DEMAND)

    def slot_entry_offset(self, lane: int, slot: int) -> int:
        """Byte offset of the slot-table entry of ``(lane, slot)``."""
        return self.slot_table_offset + (lane * self.slots_per_lane + slot) * SLOT_ENTRY_BYTES

    def slot_data_offset(self, lane: int, slot: int) -> int:
        """Byte offset of the data of ``(lane, slot)`` from the start of the ring file."""
        return self.data_offset + (lane * self.slots_per_lane + slot) * self.slot_stride

    def lane_entry_offset(self, lane: int) -> int:
        """Byte offset of the lane-table entry of ``lane``."""
        return self.lane_table_offset + lane * LANE_ENTRY_BYTES

    def consumer_entry_offset(self, lane: int) -> int:
        """Byte offset of the consumer-table entry belonging to ``lane``."""
        return self.consumer_table_offset + lane * CONSUMER_ENTRY_BYTES


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise FormatError(field, message)


def _nul_padded_text(raw: bytes, field: str, *, ascii_only: bool) -> str:
    text, _, padding = raw.partition(b"\0")
    _require(padding.strip(b"\0") == b"", field, "bytes after the NUL padding")
    try:
        return text.decode("ascii" if ascii_only else "utf-8")
    except UnicodeDecodeError:
        raise FormatError(field, "not valid " + ("ASCII" if ascii_only else "UTF-8")) from None


def parse_header(header: bytes, st_size: int) -> RingLayout:
    """Validate the first 512 bytes of a ring of ``st_size`` bytes (§5.6) and parse them.

    The returned layout has an empty ``tensors`` tuple; :func:`parse_tensor_table` fills it.
    Raises :class:`FormatError` naming the first field that breaks a rule.
    """
    _require(st_size >= HEADER_BYTES, "st_size", f"{st_size} bytes, smaller than the header")
    _require(len(header) >= HEADER_BYTES, "header", f"only {len(header)} bytes readable")
    (
        magic, major, minor, header_bytes, control_bytes, file_bytes, generation,
        producer_pid, _producer_state, start_ns, _heartbeat, lane_count, slots_per_lane,
        slot_stride, data_offset, tensor_count, tensor_off, lane_off, slot_off, consumer_off,
        consumer_capacity, batch_size, flags, batches_per_epoch, epochs, seed,
        samples_per_epoch, _reserved_152, world_size,
    ) = _HEADER.unpack_from(header, 0)  # fmt: skip
    _require(magic == MAGIC, "magic", f"{magic!r} is not {MAGIC!r}")
    _require(
        major == VERSION_MAJOR, "version_major", f"{major} (this client reads {VERSION_MAJOR})"
    )
    _require(header_bytes >= HEADER_BYTES, "header_bytes", f"{header_bytes} < 512")
    _require(file_bytes == st_size, "file_bytes", f"{file_bytes} but the file has {st_size}")
    _require(control_bytes == data_offset, "control_bytes", f"{control_bytes} != data_offset")
    _require(data_offset % PAGE == 0, "data_offset", f"{data_offset} is not a multiple of 4096")
    _require(data_offset <= file_bytes, "data_offset", f"{data_offset} > file_bytes")
    _require(generation != 0, "generation", "is zero")
    _require(lane_count >= 1, "lane_count", "is zero")
    _require(slots_per_lane >= 1, "slots_per_lane", "is zero")
    _require(1 <= tensor_count <= MAX_TENSORS, "tensor_count", f"{tensor_count} not in 1..16")
    _require(consumer_capacity >= lane_count, "consumer_capacity", "smaller than lane_count")
    _require(batch_size >= 1, "batch_size", "is zero")
    _require(slot_stride >= PAGE, "slot_stride", f"{slot_stride} < 4096")
    _require(slot_stride % PAGE == 0, "slot_stride", f"{slot_stride} not a multiple of 4096")
    tables = (
        ("tensor_table_offset", tensor_off, tensor_count * TENSOR_ENTRY_BYTES),
        ("lane_table_offset", lane_off, lane_count * LANE_ENTRY_BYTES),
        ("slot_table_offset", slot_off, lane_count * slots_per_lane * SLOT_ENTRY_BYTES),
        ("consumer_table_offset", consumer_off, consumer_capacity * CONSUMER_ENTRY_BYTES),
    )
    for field, start, size in tables:
        _require(start % 8 == 0, field, f"{start} is not a multiple of 8")
        _require(
            header_bytes <= start and start + size <= data_offset,
            field,
            f"table [{start}, {start + size}) outside [header_bytes, data_offset)"
            f" = [{header_bytes}, {data_offset})",
        )
    ordered = sorted(tables, key=lambda table: table[1])
    for (_, start_a, size_a), (field_b, start_b, _) in zip(ordered, ordered[1:]):
        _require(start_a + size_a <= start_b, field_b, "table overlaps another table")
    data_bytes = lane_count * slots_per_lane * slot_stride
    _require(
        data_offset + data_bytes <= file_bytes,
        "slot_stride",
        f"{lane_count} lanes x {slots_per_lane} slots x {slot_stride} bytes exceed file_bytes",
    )
    mean_std = _MEAN_STD.unpack_from(header, 448)
    name = _nul_padded_text(header[480:512], "name", ascii_only=False)
    return RingLayout(
        version_minor=minor,
        header_bytes=header_bytes,
        file_bytes=file_bytes,
        generation=generation,
        producer_pid=producer_pid,
        producer_start_unix_ns=start_ns,
        lane_count=lane_count,
        slots_per_lane=slots_per_lane,
        slot_stride=slot_stride,
        data_offset=data_offset,
        tensor_table_offset=tensor_off,
        lane_table_offset=lane_off,
        slot_table_offset=slot_off,
        consumer_table_offset=consumer_off,
        consumer_capacity=consumer_capacity,
        batch_size=batch_size,
        flags=flags,
        batches_per_epoch=batches_per_epoch,
        epochs=epochs,
        seed=seed,
        samples_per_epoch=samples_per_epoch,
        mean=tuple(mean_std[:4]),
        std=tuple(mean_std[4:]),
        name=name,
        tensors=(),
        world_size=world_size,
    )


def tensor_table_count(header: bytes) -> int:
    """``tensor_count`` of an already validated header."""
    count: int = struct.unpack_from("<I", header, 88)[0]
    return count


def parse_tensor_table(layout: RingLayout, table: bytes, tensor_count: int) -> RingLayout:
    """Validate the tensor table (§5.2, §5.6) and return ``layout`` with its tensors filled in.

    ``table`` holds the ``tensor_count × 64`` bytes found at ``tensor_table_offset``.
    """
    _require(len(table) >= tensor_count * TENSOR_ENTRY_BYTES, "tensor_table", "truncated")
    specs: list[TensorSpec] = []
    for i in range(tensor_count):
        raw_name, code, rank, d0, d1, d2, d3, offset = _TENSOR.unpack_from(
            table, i * TENSOR_ENTRY_BYTES
        )
        field = f"tensor[{i}]"
        name = _nul_padded_text(raw_name, f"{field}.name", ascii_only=True)
        _require(name != "", f"{field}.name", "is empty")
        _require(
            all(0x21 <= ord(ch) <= 0x7E for ch in name),
            f"{field}.name",
            "must be printable ASCII without spaces (0x21-0x7E)",
        )
        field = f"tensor[{i}] {name!r}"
        _require(code in DTYPES, f"{field}.dtype", f"unknown dtype code {code}")
        _require(1 <= rank <= MAX_RANK, f"{field}.rank", f"{rank} not in 1..4")
        dims = (d0, d1, d2, d3)
        _require(d0 == layout.batch_size, f"{field}.shape", f"shape[0] {d0} != batch_size")
        _require(all(d >= 1 for d in dims[:rank]), f"{field}.shape", "a used dimension is 0")
        _require(all(d == 0 for d in dims[rank:]), f"{field}.shape", "an unused dimension is set")
        _require(offset % 64 == 0, f"{field}.offset", f"{offset} not a multiple of 64")
        itemsize = DTYPES[code][2]
        nbytes = itemsize
        for d in dims[:rank]:
            nbytes *= d  # Python ints: no overflow; checked against the stride below
        _require(
            offset + nbytes <= layout.slot_stride,
            f"{field}.offset",
            f"tensor [{offset}, {offset + nbytes}) exceeds slot_stride {layout.slot_stride}",
        )
        _require(all(s.name != name for s in specs), f"{field}.name", "duplicate name")
        specs.append(TensorSpec(name, code, np.dtype(DTYPES[code][1]), dims[:rank], offset, nbytes))
    ordered = sorted(specs, key=lambda spec: spec.offset)
    for a, b in zip(ordered, ordered[1:]):
        _require(
            a.offset + a.nbytes <= b.offset, f"tensor {b.name!r}.offset", f"overlaps {a.name!r}"
        )
    return layout._replace(tensors=tuple(specs))


def lane_page_bytes(slots: int) -> int:
    """Size of the lane page of a lane with ``slots`` slots: whole 4096-byte pages."""
    return -(-(LANE_HEADER_BYTES + slots * LANE_SLOT_BYTES) // PAGE) * PAGE


def lane_slot_offset(slot: int) -> int:
    """Offset of slot ``slot``'s ``taken_seq`` in a lane page; its ``released_seq`` follows."""
    return LANE_HEADER_BYTES + slot * LANE_SLOT_BYTES


def validate_lane_page(
    head: bytes, st_size: int, reply_bytes: object, lane: int, slots: int
) -> None:
    """Check a lane page before mapping it read-write: its size (``st_size``) equals the attach
    reply's ``lane_page_bytes`` (``reply_bytes``) and :func:`lane_page_bytes` of the ring's
    ``slots_per_lane``, and its first 16 bytes (``head``) carry ``RFLANE``, the lane attached
    to and that slot count. Raises :class:`FormatError` naming the first field that differs."""
    want = lane_page_bytes(slots)
    _require(
        reply_bytes == want,
        "lane_page_bytes",
        f"attach reply said {reply_bytes!r}, {want} for {slots} slots per lane",
    )
    _require(st_size == want, "lane_page_bytes", f"the page has {st_size} bytes, not {want}")
    _require(len(head) >= 16, "lane_page", f"only {len(head)} bytes readable")
    magic, page_lane, page_slots = struct.unpack_from("<8sII", head, 0)
    _require(magic == LANE_MAGIC, "lane_page.magic", f"{magic!r} is not {LANE_MAGIC!r}")
    _require(page_lane == lane, "lane_page.lane", f"{page_lane}, attached to lane {lane}")
    _require(page_slots == slots, "lane_page.slots", f"{page_slots} != slots_per_lane {slots}")
