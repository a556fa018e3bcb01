"""Feedback frames (§9 of ``docs/ring-format.md``): per-sample losses and end-of-epoch marks
a consumer sends to the producer on its attach connection.

Brief overview: :func:`host_arrays` turns ids and losses (numpy arrays, torch tensors on any
device, lists) into host numpy arrays with one device-to-host copy; :func:`report_frame` and
:func:`epoch_done_frame` encode frames; :func:`all_gather` collects every rank's report when
``torch.distributed`` is initialised; :class:`Outbox` sends frames without ever blocking.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from .errors import ArgumentError, ArgumentTypeError

MAGIC = b"RFBK"
KIND_REPORT = 1
KIND_EPOCH_DONE = 2
KIND_PASS = 3  # since 1.3: a pass over an on-demand ring
MAX_REPORT_SAMPLES = 1 << 16
_HEADER = struct.Struct("<4sHHIIQ")  # magic, kind, reserved, count, reserved, epoch: 24 bytes


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def host_arrays(sample_ids: Any, losses: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int64, losses float32)`` on the host, one-dimensional.

    Torch tensors on a device are brought over in one copy (ids and losses stacked as f64,
    exact for ids below 2**53); CPU tensors and numpy arrays are not copied unless their dtype
    must change.
    """
    on_device = (
        _is_torch(sample_ids)
        and _is_torch(losses)
        and (sample_ids.device.type != "cpu" or losses.device.type != "cpu")
    )
    if on_device:
        import torch

        both = (
            torch.stack(
                (
                    sample_ids.detach().reshape(-1).to(torch.float64),
                    losses.detach().reshape(-1).to(torch.float64),
                )
            )
            .cpu()
            .numpy()
        )
        return both[0].astype(np.int64), both[1].astype(np.float32)
    if _is_torch(sample_ids):
        sample_ids = sample_ids.detach().cpu().numpy()
    if _is_torch(losses):
        losses = losses.detach().float().cpu().numpy()
    ids = np.asarray(sample_ids).reshape(-1)
    values = np.asarray(losses, dtype=np.float32).reshape(-1)
    if ids.dtype.kind not in "iu":
        raise ArgumentTypeError(f"sample ids must be integers, got dtype {ids.dtype}")
    if ids.shape != values.shape:
        raise ArgumentError(f"{ids.size} sample ids but {values.size} losses")
    return ids.astype(np.int64, copy=False), values


def check_ids(ids: np.ndarray, n: int) -> None:
    """Raise :class:`ArgumentError` (a ``ValueError``) naming the ids outside ``0..n`` (the
    dataset), if any."""
    if ids.size == 0:
        return
    if int(ids.min()) >= 0 and int(ids.max()) < n:
        return
    bad = ids[(ids < 0) | (ids >= n)]
    shown = ", ".join(str(int(i)) for i in bad[:10])
    more = f" and {bad.size - 10} more" if bad.size > 10 else ""
    raise ArgumentError(f"sample ids outside the dataset (0..{n}): {shown}{more}")


def report_frame(epoch: int, ids: np.ndarray, losses: np.ndarray) -> bytes:
    """One or more ``REPORT`` frames (split at :data:`MAX_REPORT_SAMPLES`)."""
    parts = []
    for start in range(0, ids.size, MAX_REPORT_SAMPLES):
        chunk_ids = ids[start : start + MAX_REPORT_SAMPLES]
        chunk_losses = losses[start : start + MAX_REPORT_SAMPLES]
        parts.append(_HEADER.pack(MAGIC, KIND_REPORT, 0, chunk_ids.size, 0, epoch))
        parts.append(chunk_ids.astype("<u8", copy=False).tobytes())
        parts.append(chunk_losses.astype("<f4", copy=False).tobytes())
    return b"".join(parts)


def epoch_done_frame(epoch: int) -> bytes:
    """An ``EPOCH_DONE`` frame: every report of ``epoch`` was sent before it."""
    return _HEADER.pack(MAGIC, KIND_EPOCH_DONE, 0, 0, 0, epoch)


def pass_frame(pass_number: int, index: int = 0) -> bytes:
    """A ``PASS`` frame (1.3, on-demand rings): serve pass ``pass_number`` from batch
    ``index``; its batches carry slot ``epoch = pass_number``."""
    return _HEADER.pack(MAGIC, KIND_PASS, 0, 0, 0, pass_number) + struct.pack("<Q", index)


def distributed() -> Any:
    """``torch.distributed`` when it is initialised with more than one rank, else ``None``
    (torch is never imported for this)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist if dist.get_world_size() > 1 else None


def all_gather(
    dist: Any, ids: np.ndarray, losses: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every rank's ``(ids, losses)``, in rank order: two collectives (the lengths, then the
    data padded to the longest, as f64 pairs). Runs on the process group's device."""
    import torch

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    world = dist.get_world_size()
    size = torch.tensor([ids.size], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    mine = torch.zeros((2, longest), dtype=torch.float64)
    mine[0, : ids.size] = torch.from_numpy(ids.astype(np.float64))
    mine[1, : ids.size] = torch.from_numpy(losses.astype(np.float64))
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    out = []
    for count, pair in zip(counts, gathered):
        host = pair[:, :count].cpu().numpy()
        out.append((host[0].astype(np.int64), host[1].astype(np.float32)))
    return out


def lane_share(
    per_rank: Sequence[tuple[np.ndarray, np.ndarray]], lane: int, lanes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The part of a gathered report lane ``lane`` forwards: ranks ``g`` with
    ``g % lanes == lane``. With the same lane count on every node, the lanes of each node
    together forward every rank's report exactly once, in the same per-lane order on every
    node."""
    chosen = [pair for g, pair in enumerate(per_rank) if g % lanes == lane]
    if not chosen:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return (
        np.concatenate([np.asarray(i, dtype=np.int64) for i, _ in chosen]),
        np.concatenate([np.asarray(v, dtype=np.float32) for _, v in chosen]),
    )


class Outbox:
    """Frames waiting for the socket: :meth:`send` never blocks (a busy producer leaves the
    rest queued for the next call); :meth:`drain` waits, up to a deadline, at detach."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def __len__(self) -> int:
        return len(self._pending)

    def send(self, sock: Optional[socket.socket], frame: bytes = b"") -> bool:
        """Queue ``frame`` and send what the socket takes now. False when the connection is
        broken (the producer is gone: the loader notices at its next take)."""
        self._pending += frame
        if sock is None:
            return False
        while self._pending:
            try:
                sent = sock.send(self._pending, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self._pending[:sent]
        return True

    def drain(self, sock: Optional[socket.socket], timeout_s: float = 10.0) -> None:
        """Send everything queued, waiting up to ``timeout_s`` for a busy producer (not for a
        dead one)."""
        deadline = time.monotonic() + timeout_s
        while self._pending and time.monotonic() < deadline:
            if not self.send(sock):
                return
            if self._pending:
                time.sleep(0.001)

    def clear(self) -> None:
        """Forget queued frames (their producer is gone)."""
        self._pending.clear()
