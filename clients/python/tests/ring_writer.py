"""A reference PRODUCER of the ring format 2.0, written from the format's contract alone.

It exists to test the Python client without the Rust daemon: it lays out a sealed memfd,
serves the attach handshake over a Unix socket (three descriptors with SCM_RIGHTS: the ring
reopened read-only, a fresh lane page and a doorbell eventfd per attach), publishes
deterministic batches, claims a READY slot again once the lane page says its batch was
released, reclaims the slots of consumers that die, seeks lanes on ``resume`` and reports its
state. Tests may make it hostile: :attr:`RingWriter.reply_fds_hook` rewrites the descriptors
of an attach reply, :attr:`RingWriter.page_hook` the lane page before it is passed.

In-process use (tests, benchmarks)::

    writer = RingWriter("t", runtime_dir, lanes=1, batches_per_epoch=4, epochs=2)
    writer.serve()                 # socket thread + heartbeat; nothing published yet
    writer.publish(0)              # publish the next batch of lane 0
    writer.start_producing()       # or: one thread per lane publishes until the end

As a process (multi-process tests): ``python ring_writer.py --name t --dir D ...`` prints
``READY <pid>`` on stdout once it listens, produces until the end, then keeps serving until
SIGTERM (clean stop) or SIGKILL.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import socket
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

PAGE = 4096
HEADER_BYTES = 512
STARTING, SERVING, FINISHED, STOPPED, FAILED = 0, 1, 2, 3, 4
FREE, WRITING, READY = 0, 1, 2
LANE_MAGIC = b"RFLANE\0\0"
# Lane page offsets: counters, then per slot taken_seq (+0) and released_seq (+8).
PAGE_RELEASED, PAGE_CONSUMER_WAIT_NS, PAGE_HEARTBEAT, PAGE_TAKEN = 16, 24, 32, 40
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
DTYPE_CODES = {"u8": (1, "|u1"), "i32": (2, "<i4"), "i64": (3, "<i8"), "f16": (4, "<f2"),
               "bf16": (5, "<u2"), "f32": (6, "<f4")}  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_NR_FUTEX = {"x86_64": 202, "aarch64": 98}[os.uname().machine]


def futex_wake(address: int) -> None:
    _libc.syscall(ctypes.c_long(_NR_FUTEX), ctypes.c_void_p(address), ctypes.c_int(1),
                  ctypes.c_int(2**31 - 1), None, None, ctypes.c_int(0))  # fmt: skip


def hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


def _unread(conn: socket.socket) -> int:
    """Bytes sent on ``conn`` that the peer has not read yet (SIOCOUTQ)."""
    queued: int = struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return queued


def _round_up(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def lane_page_bytes(slots: int) -> int:
    return _round_up(64 + 16 * slots, PAGE)


class LanePage:
    """The producer's side of one attach's lane page: created, read, and dropped at reclaim."""

    def __init__(self, name: str, lane: int, slots: int) -> None:
        size = lane_page_bytes(slots)
        self.fd = os.memfd_create(f"ringfeed-lane:{name}:{lane}",
                                  os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)  # fmt: skip
        os.ftruncate(self.fd, size)
        os.pwrite(self.fd, struct.pack("<8sII", LANE_MAGIC, lane, slots), 0)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)  # fmt: skip
        self.mem = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def get(self, offset: int) -> int:
        return int(struct.unpack_from("<Q", self.mem, offset)[0])

    def taken_seq(self, slot: int) -> int:
        return self.get(64 + 16 * slot)

    def released_seq(self, slot: int) -> int:
        return self.get(72 + 16 * slot)

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.doorbell)

    def close(self) -> None:
        self.mem.close()
        os.close(self.doorbell)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RingWriter:
    """A producer: lanes × slots of batches with tensors images / labels / sample_ids."""

    def __init__(
        self,
        name: str,
        runtime_dir: str | os.PathLike[str],
        *,
        lanes: int = 1,
        slots: int = 4,
        batch_size: int = 4,
        image_shape: tuple[int, ...] = (3, 8, 8),
        image_dtype: str = "f32",
        batches_per_epoch: int = 4,
        epochs: int = 2,
        seed: int = 7,
        fill: bool = True,
        version_major: int = 2,
        generation: Optional[int] = None,
    ) -> None:
        self.name = name
        self.dir = Path(runtime_dir)
        self.lanes, self.slots, self.batch_size = lanes, slots, batch_size
        self.batches_per_epoch, self.epochs, self.seed = batches_per_epoch, epochs, seed
        self.fill = fill
        self.version_major = version_major  # another major: a ring no 2.x client may read
        self.samples = lanes * batches_per_epoch * batch_size
        self.generation = generation or int.from_bytes(os.urandom(8), "little") | 1
        self.tensors: list[tuple[str, int, str, tuple[int, ...], int]] = []
        offset = 0
        for tname, dtype, shape in (
            ("images", image_dtype, (batch_size, *image_shape)),
            ("labels", "i64", (batch_size,)),
            ("sample_ids", "i64", (batch_size,)),
        ):
            code, npdtype = DTYPE_CODES[dtype]
            self.tensors.append((tname, code, npdtype, shape, offset))
            nbytes = int(np.prod(shape)) * np.dtype(npdtype).itemsize
            offset = _round_up(offset + nbytes, 64)
        self.slot_stride = _round_up(max(offset, 1), PAGE)
        self.tensor_table = HEADER_BYTES
        self.lane_table = self.tensor_table + 64 * len(self.tensors)
        self.slot_table = self.lane_table + 128 * lanes
        self.consumer_table = self.slot_table + 64 * lanes * slots
        self.data_offset = _round_up(self.consumer_table + 64 * lanes, PAGE)
        self.file_bytes = self.data_offset + lanes * slots * self.slot_stride

        self.fd = os.memfd_create(f"ringfeed-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.file_bytes)
        os.posix_fallocate(self.fd, 0, self.file_bytes)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.mem = mmap.mmap(self.fd, self.file_bytes, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        # Consumers get a read-only reopen; after our own writable mapping, nobody may make
        # another one (a kernel without FUTURE_WRITE: the read-only descriptor is the defence).
        self.ro_fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        self._write_header()
        self.cursor = [(0, 0)] * lanes  # next (epoch, index) per lane
        self.done = [False] * lanes
        self.lane_locks = [threading.Lock() for _ in range(lanes)]
        self.connections: dict[int, socket.socket] = {}
        self.pages: dict[int, LanePage] = {}  # the current attach's lane page, per lane
        self.base_counts = [[0, 0] for _ in range(lanes)]  # released, wait_ns of past attaches
        self.wake = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(lanes)]
        #: Rewrites the descriptors [ring, lane page, doorbell] of an attach reply (hostile
        #: producer tests); the writer closes the lane page's and doorbell's own later.
        self.reply_fds_hook: Optional[Callable[[list[int]], list[int]]] = None
        #: Called with each new lane page's memory before it is passed (hostile pages).
        self.page_hook: Optional[Callable[[mmap.mmap], None]] = None
        self.reply_extra: dict[str, Any] = {}  # merged into every successful attach reply
        self.fds_late = False  # send the descriptors with the reply's second part (hostile)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.listener: Optional[socket.socket] = None
        self.lock_fd: Optional[int] = None

    # ----- raw memory -------------------------------------------------------------------------

    def put(self, fmt: str, offset: int, *values: Any) -> None:
        struct.pack_into("<" + fmt, self.mem, offset, *values)

    def get(self, fmt: str, offset: int) -> Any:
        return struct.unpack_from("<" + fmt, self.mem, offset)[0]

    def lane_off(self, lane: int) -> int:
        return self.lane_table + 128 * lane

    def slot_off(self, lane: int, slot: int) -> int:
        return self.slot_table + 64 * (lane * self.slots + slot)

    def bump(self, offset: int) -> None:
        self.put("I", offset, (self.get("I", offset) + 1) & 0xFFFFFFFF)
        futex_wake(self._base + offset)

    def _write_header(self) -> None:
        self.put("8sHHIQQQIIQQ", 0, b"RINGFEED", self.version_major, 0, HEADER_BYTES,
                 self.data_offset, self.file_bytes, self.generation, os.getpid(), STARTING,
                 time.time_ns(), time.monotonic_ns())  # fmt: skip
        self.put("IIQQIIIIIIIIQQQQ", 64, self.lanes, self.slots, self.slot_stride,
                 self.data_offset, len(self.tensors), self.tensor_table, self.lane_table,
                 self.slot_table, self.consumer_table, self.lanes, self.batch_size, 1,
                 self.batches_per_epoch, self.epochs, self.seed, self.samples)  # fmt: skip
        self.put("4f4f", 448, 0.5, 0.5, 0.5, 0, 0.25, 0.25, 0.25, 0)
        self.put("32s", 480, self.name.encode())
        for lane in range(self.lanes):
            self.put("Q", self.lane_off(lane) + 16, 1)  # next_seq: seq numbers start at 1
        for i, (tname, code, _npdtype, shape, offset) in enumerate(self.tensors):
            dims = list(shape) + [0] * (4 - len(shape))
            self.put("16sII4QQ", self.tensor_table + 64 * i, tname.encode(), code, len(shape),
                     *dims, offset)  # fmt: skip

    def set_state(self, state: int) -> None:
        self.put("I", 44, state)
        for lane in range(self.lanes):
            self.bump(self.lane_off(lane))

    def slot_state(self, lane: int, slot: int) -> int:
        return int(self.get("I", self.slot_off(lane, slot)))

    def slot_seq(self, lane: int, slot: int) -> int:
        return int(self.get("Q", self.slot_off(lane, slot) + 8))

    def held(self, lane: int, slot: int) -> bool:
        """Whether the lane's current consumer holds the slot: READY, taken, not released."""
        with self.lane_locks[lane]:
            page = self.pages.get(lane)
            seq = self.slot_seq(lane, slot)
            return (
                page is not None
                and self.slot_state(lane, slot) == READY
                and page.taken_seq(slot) == seq
                and page.released_seq(slot) != seq
            )

    def claimable(self, lane: int, slot: int) -> bool:
        """Whether the producer may write the slot again: FREE, or READY and released."""
        with self.lane_locks[lane]:
            return self._claimable_locked(lane, slot)

    def _claimable_locked(self, lane: int, slot: int) -> bool:
        state = self.slot_state(lane, slot)
        if state == FREE:
            return True
        page = self.pages.get(lane)
        seq = self.slot_seq(lane, slot)
        return state == READY and page is not None and seq != 0 and page.released_seq(slot) == seq

    def page_field(self, lane: int, offset: int) -> int:
        """A u64 of the lane's current lane page (PAGE_RELEASED, PAGE_TAKEN...)."""
        with self.lane_locks[lane]:
            return self.pages[lane].get(offset)

    def lane_field(self, lane: int, fmt: str, offset: int) -> int:
        return int(self.get(fmt, self.lane_off(lane) + offset))

    # ----- batch content ----------------------------------------------------------------------

    def sample_ids(self, lane: int, epoch: int, index: int) -> np.ndarray:
        """Deterministic ids: lanes interleave batches; each epoch rotates the dataset."""
        start = (index * self.lanes + lane) * self.batch_size
        ids = np.arange(start, start + self.batch_size, dtype=np.int64)
        return (ids + epoch * self.batch_size * 3) % self.samples

    def _write_batch(self, lane: int, slot: int, epoch: int, index: int) -> None:
        base = self.data_offset + (lane * self.slots + slot) * self.slot_stride
        ids = self.sample_ids(lane, epoch, index)
        for tname, _code, npdtype, shape, offset in self.tensors:
            if not self.fill and tname == "images":
                continue
            view = np.ndarray(shape, dtype=npdtype, buffer=self.mem, offset=base + offset)
            if tname == "images":
                view[...] = (ids / self.samples).reshape((-1,) + (1,) * (len(shape) - 1))
            elif tname == "labels":
                view[...] = ids % 10
            else:
                view[...] = ids

    # ----- publishing -------------------------------------------------------------------------

    def _claim(self, lane: int) -> Optional[int]:
        for slot in range(self.slots):
            if self._claimable_locked(lane, slot):
                self.put("I", self.slot_off(lane, slot), WRITING)
                return slot
        return None

    def publish(self, lane: int, timeout_s: float = 10.0) -> Optional[tuple[int, int]]:
        """Publish lane's next batch, waiting for a claimable slot. None once the lane is done."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lane_locks[lane]:
                if self.done[lane]:
                    return None
                page = self.pages.get(lane)
                bells = [self.wake[lane]] + ([page.doorbell] if page is not None else [])
                slot = self._claim(lane)
                if slot is not None:
                    return self._publish_into(lane, slot)
            if time.monotonic() > deadline or self._stop.is_set():
                raise TimeoutError(f"lane {lane}: no free slot")
            started = time.monotonic_ns()
            # A release rings the doorbell; an attach that ended closed it: rescan then.
            with contextlib.suppress(OSError, ValueError):
                select.select(bells, [], [], 0.1)
            with self.lane_locks[lane]:  # drain only descriptors that are still ours
                current = self.pages.get(lane)
                if current is not None:
                    current.drain()
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.wake[lane])
            waited = time.monotonic_ns() - started
            self.put("Q", self.lane_off(lane) + 48, self.lane_field(lane, "Q", 48) + waited)

    def _publish_into(self, lane: int, slot: int) -> tuple[int, int]:
        epoch, index = self.cursor[lane]
        self._write_batch(lane, slot, epoch, index)
        last = index + 1 == self.batches_per_epoch
        lane_off = self.lane_off(lane)
        seq = self.lane_field(lane, "Q", 16)
        self.put("QQQII", self.slot_off(lane, slot) + 8, seq, epoch, index, self.batch_size,
                 1 if last else 0)  # fmt: skip
        self.put("Q", self.slot_off(lane, slot) + 40, time.monotonic_ns())
        self.put("I", self.slot_off(lane, slot), READY)  # the release store of §6 step 3
        self.put("QQ", lane_off + 16, seq + 1, self.lane_field(lane, "Q", 24) + 1)
        self.put("QQ", lane_off + 56, epoch, index)
        self.put("Q", 184, self.get("Q", 184) + 1)
        self.put("Q", 160, self.get("Q", 160) + self.batch_size)
        self.cursor[lane] = (epoch + 1, 0) if last else (epoch, index + 1)
        if self.epochs and self.cursor[lane][0] >= self.epochs:
            self.done[lane] = True
        self.bump(lane_off)
        if all(self.done):
            self.set_state(FINISHED)
        return epoch, index

    def start_producing(self) -> None:
        for lane in range(self.lanes):
            thread = threading.Thread(target=self._produce, args=(lane,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _produce(self, lane: int) -> None:
        while not self._stop.is_set():
            try:
                if self.publish(lane, timeout_s=3600) is None:
                    return
            except TimeoutError:
                return

    # ----- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_path = self.dir / f"{self.name}.lock"
        self.lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(self.lock_fd, 0)
        os.write(self.lock_fd, str(os.getpid()).encode())
        sock_path = self.dir / f"{self.name}.sock"
        if sock_path.exists():
            sock_path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(sock_path))
        self.listener.listen(16)
        self.set_state(SERVING)
        for target in (self._accept_loop, self._heartbeat_loop):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(0.05):
            self.put("Q", 56, time.monotonic_ns())
            for lane in range(self.lanes):
                with self.lane_locks[lane]:
                    self._copy_counts(lane)

    def _copy_counts(self, lane: int) -> None:
        """The lane page's counters into the ring's tables (statistics for observers)."""
        page = self.pages.get(lane)
        released, waited = self.base_counts[lane]
        if page is not None:
            released += page.get(PAGE_RELEASED)
            waited += page.get(PAGE_CONSUMER_WAIT_NS)
        mask = (1 << 64) - 1
        self.put("QQ", self.lane_off(lane) + 32, released & mask, waited & mask)
        consumer = self.consumer_table + 64 * lane
        if page is not None:
            self.put("QQ", consumer + 16, page.get(PAGE_HEARTBEAT), page.get(PAGE_TAKEN))

    def _accept_loop(self) -> None:
        assert self.listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _reply(
        self, conn: socket.socket, obj: dict[str, Any], fds: Optional[list[int]] = None
    ) -> None:
        data = json.dumps(obj).encode() + b"\n"
        if fds and self.fds_late:  # hostile: the descriptors come after the first bytes
            conn.sendall(data[:1])
            deadline = time.monotonic() + 10  # until the consumer has read the first byte
            while _unread(conn) and time.monotonic() < deadline:
                time.sleep(0.001)
            socket.send_fds(conn, [data[1:]], fds)
            return
        socket.send_fds(conn, [data], fds or [])

    def _handle(self, conn: socket.socket) -> None:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET,
                                                              socket.SO_PEERCRED, 12))  # fmt: skip
        if uid != os.getuid():
            self._reply(conn, {"ok": False, "error": f"permission denied for uid {uid}"})
            conn.close()
            return
        line = b""
        while not line.endswith(b"\n") and len(line) <= 4096:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            line += chunk
        try:
            request = json.loads(line)
        except ValueError:
            self._reply(conn, {"ok": False, "error": "bad request: not JSON"})
            conn.close()
            return
        if request.get("op") == "info":
            lanes = [{"lane": i, "consumer_pid": self.lane_field(i, "I", 8)}
                     for i in range(self.lanes)]  # fmt: skip
            self._reply(conn, {"ok": True, "generation": self.generation,
                               "producer_pid": os.getpid(), "name": self.name,
                               "lane_count": self.lanes, "lanes": lanes})  # fmt: skip
            conn.close()
            return
        error = self._attach(conn, request)
        if error is not None:
            self._reply(conn, {"ok": False, "error": error})
            conn.close()
            return
        lane = int(request["lane"])
        # Liveness: the connection stays open while attached; EOF means the consumer is gone.
        while True:
            try:
                if not conn.recv(4096):
                    break
            except OSError:
                break
        self._reclaim(lane, conn)
        conn.close()

    def _attach(self, conn: socket.socket, request: dict[str, Any]) -> Optional[str]:
        if request.get("op") != "attach":
            return f"bad request: unknown op {request.get('op')!r}"
        if request.get("version") != 2:
            return f"version mismatch: producer speaks 2, consumer {request.get('version')!r}"
        lane = request.get("lane")
        if not isinstance(lane, int) or not 0 <= lane < self.lanes:
            return f"lane {lane!r} out of range 0..{self.lanes - 1}"
        with self.lane_locks[lane]:
            holder = self.lane_field(lane, "I", 8)
            previous = self.connections.get(lane)
            if previous is not None and hung_up(previous):
                self._reclaim_locked(lane, previous)  # it closed and re-attaches at once (§3)
            elif holder and previous is not None:
                return f"lane {lane} already held by live consumer pid {holder}"
            resume = request.get("resume")
            if resume is not None:
                for slot in range(self.slots):
                    if self.slot_state(lane, slot) == READY:
                        self.put("I", self.slot_off(lane, slot), FREE)
                self.put("I", self.lane_off(lane) + 12, self.lane_field(lane, "I", 12) + 1)
                self.cursor[lane] = (int(resume["epoch"]), int(resume["index"]))
                self.done[lane] = bool(self.epochs) and self.cursor[lane][0] >= self.epochs
            pid = int(request.get("pid", 0))
            self.put("I", self.lane_off(lane) + 8, pid)
            self.put("IIQQQ", self.consumer_table + 64 * lane, pid, lane, time.time_ns(), 0, 0)
            page = LanePage(self.name, lane, self.slots)
            if self.page_hook is not None:
                self.page_hook(page.mem)
            self.connections[lane] = conn
            self.pages[lane] = page
            fds = [self.ro_fd, page.fd, page.doorbell]
            if self.reply_fds_hook is not None:
                fds = self.reply_fds_hook(fds)
            reply = {"ok": True, "generation": self.generation, "lane": lane,
                     "file_bytes": self.file_bytes, "producer_pid": os.getpid(),
                     "fds": ["ring", "lane", "doorbell"],
                     "lane_page_bytes": lane_page_bytes(self.slots)}  # fmt: skip
            reply.update(self.reply_extra)
            self._reply(conn, reply, fds)
            os.close(page.fd)  # the consumer has its own; the mapping stays
            page.fd = -1
            os.eventfd_write(self.wake[lane], 1)
        if self.get("I", 44) == FINISHED and not all(self.done):
            self.put("I", 44, SERVING)
        return None

    def _reclaim(self, lane: int, conn: socket.socket) -> None:
        with self.lane_locks[lane]:
            self._reclaim_locked(lane, conn)

    def _reclaim_locked(self, lane: int, conn: socket.socket) -> None:
        if self.connections.get(lane) is not conn:
            return
        del self.connections[lane]
        page = self.pages.pop(lane, None)
        if page is not None:
            # The page's last word: released batches are free, taken ones are redelivered.
            for slot in range(self.slots):
                off = self.slot_off(lane, slot)
                seq = self.slot_seq(lane, slot)
                if self.slot_state(lane, slot) != READY or seq == 0:
                    continue
                if page.released_seq(slot) == seq:
                    self.put("I", off, FREE)
                elif page.taken_seq(slot) == seq:
                    self.put("I", off + 36, self.get("I", off + 36) | 2)
            self.base_counts[lane][0] += page.get(PAGE_RELEASED)
            self.base_counts[lane][1] += page.get(PAGE_CONSUMER_WAIT_NS)
            page.close()
        self._copy_counts(lane)
        self.put("I", self.lane_off(lane) + 8, 0)
        self.put("IIQQQ", self.consumer_table + 64 * lane, 0, 0, 0, 0, 0)
        self.bump(self.lane_off(lane))
        os.eventfd_write(self.wake[lane], 1)

    def wait_attached(self, lane: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while lane not in self.connections:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no consumer attached to lane {lane}")
            time.sleep(0.005)

    def wait_detached(self, lane: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while lane in self.connections:
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer of lane {lane} still attached")
            time.sleep(0.005)

    def stop(self, state: int = STOPPED) -> None:
        """Clean shutdown: state, wake everyone, close connections, remove sock and lock."""
        self._stop.set()
        self.set_state(state)
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections.values()):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError as err:
                if err.errno not in (errno.ENOTCONN, errno.EBADF):  # consumer already left
                    raise
        for path in (self.dir / f"{self.name}.sock", self.dir / f"{self.name}.lock"):
            path.unlink(missing_ok=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--lanes", type=int, default=1)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches-per-epoch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-produce", action="store_true")
    parser.add_argument("--version-major", type=int, default=2)
    parser.add_argument(
        "--poke",
        action="append",
        default=[],
        metavar="FMT:OFFSET:VALUE",
        help="after writing the header, store VALUE at OFFSET with struct format FMT (a"
        " hostile producer; e.g. I:88:17 sets tensor_count to 17)",
    )
    args = parser.parse_args()
    writer = RingWriter(args.name, args.dir, lanes=args.lanes, slots=args.slots,
                        batch_size=args.batch_size, batches_per_epoch=args.batches_per_epoch,
                        epochs=args.epochs, version_major=args.version_major)  # fmt: skip
    for poke in args.poke:
        fmt, offset, value = poke.split(":", 2)
        writer.put(fmt, int(offset, 0), value.encode() if fmt.endswith("s") else int(value, 0))
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    writer.serve()
    if not args.no_produce:
        writer.start_producing()
    print(f"READY {os.getpid()}", flush=True)
    stopped.wait()
    writer.stop()


if __name__ == "__main__":
    main()
