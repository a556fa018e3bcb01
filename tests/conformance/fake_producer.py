#!/usr/bin/env python3
"""A small ring format 2.0 producer for tests/conformance/run.py, written from the format
alone, that can lie: it serves a real ring (one lane, deterministic batches, the 2.0 slot
rules over the consumer's lane page and doorbell, reclaim on hang-up), and on request a ring
or a handshake no client may accept.

Honest by default: the ring descriptor is an ``O_RDONLY`` reopen of a sealed memfd, each
attach gets a new sealed lane page (``RFLANE``, lane, slots) and a new eventfd, and the reply
carries exactly those three descriptors. Each hostile option breaks one promise:

- ``--poke FMT:OFFSET:VALUE``: a header or table field (struct format, ring offset, value);
  ``--poke-after-attach`` the same, written once the attach reply is sent (a client sees it
  at run time, not while validating);
- ``--lane-poke FMT:OFFSET:VALUE``: a lane page field before the page is passed;
- ``--lane-page-bytes N``: the lane page's size (the reply says the same);
  ``--reply-lane-page-bytes N``: only what the reply says;
- ``--fds N``: pass the first N of ring, lane page, doorbell (4: a second doorbell too);
- ``--writable-ring``: pass the ring's own ``O_RDWR`` descriptor.

Prints ``READY <pid>`` once it listens; serves until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import mmap
import os
import select
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

PAGE = 4096
HEADER_BYTES = 512
SERVING, FINISHED = 1, 2
FREE, WRITING, READY = 0, 1, 2
F32, I64 = 6, 3
LANE_MAGIC = b"RFLANE\0\0"
LANE_HEADER_BYTES, LANE_SLOT_BYTES = 64, 16

_libc = ctypes.CDLL(None, use_errno=True)
_NR_FUTEX = {"x86_64": 202, "aarch64": 98}[os.uname().machine]


def futex_wake(address: int) -> None:
    _libc.syscall(ctypes.c_long(_NR_FUTEX), ctypes.c_void_p(address), ctypes.c_int(1),
                  ctypes.c_int(2**31 - 1), None, None, ctypes.c_int(0))  # fmt: skip


def round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def lane_page_bytes(slots: int) -> int:
    return round_up(LANE_HEADER_BYTES + LANE_SLOT_BYTES * slots, PAGE)


def poke(mem: mmap.mmap, spec: str) -> None:
    fmt, offset, value = spec.split(":", 2)
    data = value.encode() if fmt.endswith("s") else int(value, 0)
    struct.pack_into("<" + fmt, mem, int(offset, 0), data)


class Attach:
    """One accepted attach: its connection, lane page (mapped) and doorbell."""

    def __init__(self, conn: socket.socket, page_fd: int, page: mmap.mmap, doorbell: int):
        self.conn, self.page_fd, self.page, self.doorbell = conn, page_fd, page, doorbell

    def taken_seq(self, slot: int) -> int:
        return int(struct.unpack_from("<Q", self.page, LANE_HEADER_BYTES + 16 * slot)[0])

    def released_seq(self, slot: int) -> int:
        return int(struct.unpack_from("<Q", self.page, LANE_HEADER_BYTES + 16 * slot + 8)[0])

    def close(self) -> None:
        self.page.close()
        os.close(self.page_fd)
        os.close(self.doorbell)
        self.conn.close()


class FakeProducer:
    """Lane 0 of a ring with tensors images (f32 3×8×8), labels and sample_ids (i64)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.name = args.name
        self.slots, self.batch = 4, 4
        self.batches_per_epoch, self.epochs = 4, 2
        self.samples = self.batches_per_epoch * self.batch
        self.generation = int.from_bytes(os.urandom(8), "little") | 1
        self.tensors = [("images", F32, "<f4", (self.batch, 3, 8, 8)),
                        ("labels", I64, "<i8", (self.batch,)),
                        ("sample_ids", I64, "<i8", (self.batch,))]  # fmt: skip
        self.offsets, offset = [], 0
        for _name, _code, npdtype, shape in self.tensors:
            self.offsets.append(offset)
            offset = round_up(offset + int(np.prod(shape)) * np.dtype(npdtype).itemsize, 64)
        self.stride = round_up(offset, PAGE)
        self.tensor_table = HEADER_BYTES
        self.lane_table = self.tensor_table + 64 * len(self.tensors)  # 704
        self.slot_table = self.lane_table + 128
        self.consumer_table = self.slot_table + 64 * self.slots
        self.data_offset = round_up(self.consumer_table + 64, PAGE)
        self.file_bytes = self.data_offset + self.slots * self.stride
        self.fd = os.memfd_create(f"ringfeed:{self.name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.file_bytes)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # fmt: skip
        self.mem = mmap.mmap(self.fd, self.file_bytes, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        # The consumers' descriptor: a read-only open file description of the same memory.
        self.ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.write_header()
        for spec in args.poke:
            poke(self.mem, spec)
        self.lock = threading.Lock()
        self.attach: Optional[Attach] = None
        self.cursor = (0, 0)
        self.seq = 1

    # ----- the ring ------------------------------------------------------------------------

    def put(self, fmt: str, offset: int, *values: Any) -> None:
        struct.pack_into("<" + fmt, self.mem, offset, *values)

    def get(self, fmt: str, offset: int) -> int:
        return int(struct.unpack_from("<" + fmt, self.mem, offset)[0])

    def slot_off(self, slot: int) -> int:
        return self.slot_table + 64 * slot

    def bump_publish_seq(self) -> None:
        self.put("I", self.lane_table, (self.get("I", self.lane_table) + 1) & 0xFFFFFFFF)
        futex_wake(self.base + self.lane_table)

    def write_header(self) -> None:
        self.put("8sHHIQQQIIQQ", 0, b"RINGFEED", self.args.version_major, 0, HEADER_BYTES,
                 self.data_offset, self.file_bytes, self.generation, os.getpid(), SERVING,
                 time.time_ns(), time.monotonic_ns())  # fmt: skip
        self.put("IIQQIIIIIIIIQQQQ", 64, 1, self.slots, self.stride, self.data_offset,
                 len(self.tensors), self.tensor_table, self.lane_table, self.slot_table,
                 self.consumer_table, 1, self.batch, 1, self.batches_per_epoch, self.epochs,
                 11, self.samples)  # fmt: skip
        self.put("32s", 480, self.name.encode())
        self.put("Q", self.lane_table + 16, 1)  # next_seq: seq numbers start at 1
        for i, (name, code, _npdtype, shape) in enumerate(self.tensors):
            dims = list(shape) + [0] * (4 - len(shape))
            self.put("16sII4QQ", self.tensor_table + 64 * i, name.encode(), code, len(shape),
                     *dims, self.offsets[i])  # fmt: skip

    def heartbeat(self) -> None:
        while True:
            self.put("Q", 56, time.monotonic_ns())
            time.sleep(0.05)

    # ----- publishing (2.0 slot rules) -----------------------------------------------------

    def claim(self) -> Optional[int]:
        """A FREE slot, or a READY one whose batch the current attach's page says released."""
        for slot in range(self.slots):
            off = self.slot_off(slot)
            state = self.get("I", off)
            if state == FREE:
                return slot
            attach = self.attach
            if state == READY and attach and attach.released_seq(slot) == self.get("Q", off + 8):
                return slot
        return None

    def write_batch(self, slot: int, epoch: int, index: int) -> None:
        base = self.data_offset + slot * self.stride
        start = index * self.batch
        ids = (np.arange(start, start + self.batch, dtype=np.int64) + 3 * epoch) % self.samples
        for (name, _code, npdtype, shape), offset in zip(self.tensors, self.offsets):
            view = np.ndarray(shape, dtype=npdtype, buffer=self.mem, offset=base + offset)
            if name == "images":
                view[...] = (ids / self.samples).reshape((-1, 1, 1, 1)) + epoch
            else:
                view[...] = ids % 10 if name == "labels" else ids

    def produce(self) -> None:
        while self.cursor[0] < self.epochs:
            with self.lock:
                slot = self.claim()
                if slot is not None:
                    self.publish(slot)
                    continue
                doorbell = self.attach.doorbell if self.attach is not None else None
            if doorbell is None:
                time.sleep(0.02)
                continue
            try:
                ready, _, _ = select.select([doorbell], [], [], 0.1)
            except (OSError, ValueError):  # closed by a reclaim meanwhile
                continue
            if ready:
                with contextlib.suppress(OSError):  # drained, or closed by a reclaim meanwhile
                    os.eventfd_read(doorbell)
        with self.lock:
            self.put("I", 44, FINISHED)
            self.bump_publish_seq()

    def publish(self, slot: int) -> None:
        off = self.slot_off(slot)
        epoch, index = self.cursor
        self.put("I", off, WRITING)
        self.write_batch(slot, epoch, index)
        last = index + 1 == self.batches_per_epoch
        self.put("QQQII", off + 8, self.seq, epoch, index, self.batch, 1 if last else 0)
        self.put("I", off, READY)
        self.seq += 1
        self.put("Q", self.lane_table + 16, self.seq)
        self.cursor = (epoch + 1, 0) if last else (epoch, index + 1)
        self.bump_publish_seq()

    # ----- serving -------------------------------------------------------------------------

    def lane_page(self) -> tuple[int, mmap.mmap, int]:
        size = self.args.lane_page_bytes or lane_page_bytes(self.slots)
        fd = os.memfd_create(f"ringfeed-lane:{self.name}:0", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # fmt: skip
        page = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        struct.pack_into("<8sII", page, 0, LANE_MAGIC, 0, self.slots)
        for spec in self.args.lane_poke:
            poke(page, spec)
        return fd, page, size

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n") and len(line) <= 4096:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            line += chunk
        request = json.loads(line)

        def refuse(code: str, error: str, retry: bool = False) -> None:
            reply = {"ok": False, "code": code, "retry": retry, "error": error}
            conn.sendall(json.dumps(reply).encode() + b"\n")
            conn.close()

        if request.get("version") != 2:
            return refuse("version", f"producer speaks 2, consumer {request.get('version')!r}")
        if request.get("lane") != 0:
            return refuse("bad_lane", f"lane {request.get('lane')!r} out of range 0..0")
        with self.lock:
            if self.attach is not None:
                return refuse("lane_held", "lane 0 is held by a live consumer", True)
            page_fd, page, size = self.lane_page()
            doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            ring = self.fd if self.args.writable_ring else self.ro_fd
            fds = [ring, page_fd, doorbell, doorbell][: self.args.fds]
            reply = {"ok": True, "generation": self.generation,
                     "generation_str": str(self.generation), "lane": 0,
                     "file_bytes": self.file_bytes, "producer_pid": os.getpid(),
                     "segment": "memfd", "fds": ["ring", "lane", "doorbell"],
                     "lane_page_bytes": self.args.reply_lane_page_bytes or size}  # fmt: skip
            socket.send_fds(conn, [json.dumps(reply).encode() + b"\n"], fds)
            self.attach = Attach(conn, page_fd, page, doorbell)
            for spec in self.args.poke_after_attach:
                poke(self.mem, spec)
            self.bump_publish_seq()
        while True:  # the connection stays open while attached; EOF: the consumer is gone
            try:
                if not conn.recv(4096):
                    break
            except OSError:
                break
        self.reclaim()

    def reclaim(self) -> None:
        """The consumer is gone: free what it released, flag what it took as redelivered."""
        with self.lock:
            attach, self.attach = self.attach, None
            assert attach is not None
            for slot in range(self.slots):
                off = self.slot_off(slot)
                seq = self.get("Q", off + 8)
                if self.get("I", off) != READY:
                    continue
                if attach.released_seq(slot) == seq:
                    self.put("I", off, FREE)
                elif attach.taken_seq(slot) == seq:
                    self.put("I", off + 36, self.get("I", off + 36) | 2)
            attach.close()
            self.bump_publish_seq()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    parser.add_argument("--version-major", type=int, default=2)
    parser.add_argument("--no-produce", action="store_true")
    parser.add_argument("--poke", action="append", default=[], metavar="FMT:OFFSET:VALUE")
    parser.add_argument("--poke-after-attach", action="append", default=[],
                        metavar="FMT:OFFSET:VALUE")  # fmt: skip
    parser.add_argument("--lane-poke", action="append", default=[], metavar="FMT:OFFSET:VALUE")
    parser.add_argument("--lane-page-bytes", type=int, default=0)
    parser.add_argument("--reply-lane-page-bytes", type=int, default=0)
    parser.add_argument("--fds", type=int, default=3, choices=range(0, 5))
    parser.add_argument("--writable-ring", action="store_true")
    args = parser.parse_args()
    producer = FakeProducer(args)
    sock_path = args.dir / f"{args.name}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    threading.Thread(target=producer.heartbeat, daemon=True).start()
    if not args.no_produce:
        threading.Thread(target=producer.produce, daemon=True).start()
    print(f"READY {os.getpid()}", flush=True)
    producer.serve(listener)


if __name__ == "__main__":
    main()
