"""Header and tensor-table validation (§5.6): every rule refuses with the field it names, and
random corruption of a valid ring yields FormatError or a sound ring, never a crash."""

from __future__ import annotations

import fcntl
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest

import ringfeed
from ring_writer import RingWriter
from ringfeed.layout import lane_page_bytes, parse_header, validate_lane_page


@pytest.fixture
def ring_bytes(runtime_dir: Path) -> bytes:
    writer = RingWriter("fuzz", runtime_dir, lanes=2, slots=2, batch_size=4)
    data = bytes(writer.mem[:])
    os.close(writer.fd)
    os.close(writer.ro_fd)
    return data


def sealed_memfd(data: bytes, *, seal: bool = True) -> int:
    fd = os.memfd_create("ring-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def open_ring(data: bytes, **options: bool) -> ringfeed.Ring:
    fd = sealed_memfd(data, **options)
    try:
        return ringfeed.Ring.from_fd(fd)
    finally:
        os.close(fd)


def patched(data: bytes, offset: int, fmt: str, value: object) -> bytes:
    buffer = bytearray(data)
    struct.pack_into("<" + fmt, buffer, offset, value)
    return bytes(buffer)


def test_valid_ring_parses_with_its_schema(ring_bytes: bytes) -> None:
    ring = open_ring(ring_bytes)
    layout = ring.layout
    assert (layout.lane_count, layout.slots_per_lane, layout.batch_size) == (2, 2, 4)
    assert [t.name for t in layout.tensors] == ["images", "labels", "sample_ids"]
    assert layout.tensors[0].shape == (4, 3, 8, 8)
    assert layout.tensors[0].dtype == np.float32
    assert layout.drop_last
    assert not layout.nhwc
    assert layout.name == "fuzz"
    arrays = ring.slot_arrays(1, 1)
    assert not arrays["images"].flags.writeable


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "field"),
    [
        (0, "8s", b"RINGFEEX", "magic"),
        (8, "H", 1, "version_major"),  # a 1.x ring: its consumers wrote the control region
        (8, "H", 3, "version_major"),
        (12, "I", 256, "header_bytes"),
        (16, "Q", 8192, "control_bytes"),
        (24, "Q", 1 << 40, "file_bytes"),
        (32, "Q", 0, "generation"),
        (64, "I", 0, "lane_count"),
        (68, "I", 0, "slots_per_lane"),
        (72, "Q", 4095, "slot_stride"),
        (72, "Q", 6144, "slot_stride"),
        (72, "Q", 1 << 60, "slot_stride"),
        (88, "I", 0, "tensor_count"),
        (88, "I", 17, "tensor_count"),
        (92, "I", 100, "tensor_table_offset"),
        (96, "I", 4090, "lane_table_offset"),
        (96, "I", 512, "lane_table_offset"),
        (100, "I", 1028, "slot_table_offset"),
        (108, "I", 1, "consumer_capacity"),
        (112, "I", 0, "batch_size"),
        (512 + 16, "I", 9, "tensor[0] 'images'.dtype"),
        (512 + 20, "I", 5, "tensor[0] 'images'.rank"),
        (512 + 24, "Q", 5, "tensor[0] 'images'.shape"),
        (512 + 32, "Q", 0, "tensor[0] 'images'.shape"),
        (512 + 64 + 32, "Q", 3, "tensor[1] 'labels'.shape"),
        (512 + 56, "Q", 32, "tensor[0] 'images'.offset"),
        (512 + 56, "Q", 4096, "tensor[0] 'images'.offset"),
        (512 + 64 + 56, "Q", 64, "tensor 'labels'.offset"),
        (512, "16s", b"", "tensor[0].name"),
        (512 + 64, "16s", b"images", "tensor[1] 'images'.name"),
        (512 + 64, "16s", b"lab\xffels", "tensor[1].name"),
    ],
)
def test_each_rule_names_its_field(
    ring_bytes: bytes, offset: int, fmt: str, value: object, field: str
) -> None:
    with pytest.raises(ringfeed.FormatError) as caught:
        open_ring(patched(ring_bytes, offset, fmt, value))
    assert caught.value.field == field


def test_truncated_and_unsealed_files_are_refused(ring_bytes: bytes) -> None:
    with pytest.raises(ringfeed.FormatError) as caught:
        open_ring(ring_bytes[:-4096])
    assert caught.value.field == "file_bytes"
    with pytest.raises(ringfeed.FormatError) as caught:
        open_ring(ring_bytes[:100])
    assert caught.value.field == "st_size"
    with pytest.raises(ringfeed.FormatError) as caught:
        open_ring(ring_bytes, seal=False)
    assert caught.value.field == "seals"


def test_generation_must_match_the_attach_reply(ring_bytes: bytes) -> None:
    fd = sealed_memfd(ring_bytes)
    try:
        generation = parse_header(ring_bytes[:512], len(ring_bytes)).generation
        with pytest.raises(ringfeed.FormatError) as caught:
            ringfeed.Ring.from_fd(fd, generation=generation + 1)
        assert caught.value.field == "generation"
    finally:
        os.close(fd)


def test_from_path_opens_a_ring_file(ring_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "ring"
    path.write_bytes(ring_bytes)
    assert ringfeed.Ring.from_path(path).layout.lane_count == 2
    path.write_bytes(b"garbage" * 100)
    with pytest.raises(ringfeed.FormatError):
        ringfeed.Ring.from_path(path)


@pytest.mark.parametrize("state", [3, 7])  # 3 was HELD in 1.x: 2.0 has no such state
def test_a_bad_slot_state_is_a_format_error(ring_bytes: bytes, state: int) -> None:
    offset = parse_header(ring_bytes[:512], len(ring_bytes)).slot_entry_offset(0, 1)
    ring = open_ring(patched(ring_bytes, offset, "I", state))
    with pytest.raises(ringfeed.FormatError) as caught:
        ring.next_ready(0)
    assert caught.value.field == "lane 0 slot 1 state"


def test_the_ring_is_mapped_read_only(ring_bytes: bytes) -> None:
    ring = open_ring(ring_bytes)
    with pytest.raises(TypeError):
        ring._control[0] = 0  # the control region: header, tables
    with pytest.raises(TypeError):
        memoryview(ring._data)[0] = 0  # the data region
    with pytest.raises(ringfeed.RingfeedError, match="no lane page"):
        ring.release(0, 0)  # a ring mapped without an attach has no lane page to write


def lane_page(lane: int = 1, slots: int = 2, size: int = 4096) -> bytes:
    page = bytearray(size)
    struct.pack_into("<8sII", page, 0, b"RFLANE\0\0", lane, slots)
    return bytes(page)


def test_lane_pages_are_whole_pages() -> None:
    assert [lane_page_bytes(s) for s in (1, 252, 253, 508, 509)] == [4096] * 2 + [8192] * 2 + [
        12288
    ]


@pytest.mark.parametrize(
    ("page", "reply_bytes", "field"),
    [
        (lane_page(), 8192, "lane_page_bytes"),  # the reply disagrees with the formula
        (lane_page(), "4096", "lane_page_bytes"),
        (lane_page(size=8192), 8192, "lane_page_bytes"),  # both disagree with the formula
        (lane_page(size=8192), 4096, "lane_page_bytes"),  # the page disagrees with the reply
        (b"RFLANX\0\0" + lane_page()[8:], 4096, "lane_page.magic"),
        (lane_page(lane=0), 4096, "lane_page.lane"),
        (lane_page(slots=3), 4096, "lane_page.slots"),
    ],
)
def test_each_lane_page_rule_names_its_field(page: bytes, reply_bytes: object, field: str) -> None:
    with pytest.raises(ringfeed.FormatError) as caught:
        validate_lane_page(page[:16], len(page), reply_bytes, 1, 2)
    assert caught.value.field == field
    validate_lane_page(lane_page()[:16], 4096, 4096, 1, 2)  # the page as the producer makes it


# Header bytes a reader validates: everything up to offset 152 (reserved in 2.0) except the
# live producer_state and heartbeat, the name, and the tensor table of the fixture's three
# tensors.
VALIDATED = [(0, 44), (48, 56), (64, 152), (480, 512), (512, 512 + 3 * 64)]


def touches_validated_bytes(start: int, end: int) -> bool:
    return any(start < hi and lo < end for lo, hi in VALIDATED)


def test_random_corruptions_never_crash(ring_bytes: bytes) -> None:
    rng = random.Random(20261127)
    outcomes = {"format_error": 0, "valid": 0}
    for trial in range(1000):
        data = bytearray(ring_bytes)
        validated_touched = True
        if trial % 10 == 0:
            data = data[: rng.randrange(0, len(data))]
        else:
            validated_touched = False
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(0, 4096)
                width = rng.choice((1, 1, 2, 4, 8))
                data[position : position + width] = rng.randbytes(width)
                validated_touched |= touches_validated_bytes(position, position + width)
        try:
            ring = open_ring(bytes(data))
        except ringfeed.FormatError:
            assert validated_touched, (
                f"trial {trial}: refused a ring whose checked bytes are intact"
            )
            outcomes["format_error"] += 1
            continue
        outcomes["valid"] += 1
        # A ring that passed validation must be fully readable: touch every tensor of every slot.
        layout = ring.layout
        for lane in range(layout.lane_count):
            for slot in range(layout.slots_per_lane):
                for array in ring.slot_arrays(lane, slot).values():
                    assert array.nbytes > 0
                    array.view(np.uint8).sum()
    assert outcomes["format_error"] > 100
    assert outcomes["valid"] > 100
