"""Device copies that never read a recycled slot: fences, deferred releases, u8 normalisation.

Brief overview: a copy to a GPU from a pinned ring slot is only *enqueued* when
``x.cuda(non_blocking=True)`` returns; the DMA reads the slot later. A slot handed back before
that DMA ran would be refilled by the daemon under it. So a batch copied to a device carries
*fences* (CUDA events recorded after its copies), and releasing it hands the slot back only once
every fence has completed. :class:`PendingReleases` keeps the releases whose fences are still
running and retires them as they complete, waiting on the oldest only when the lane would
otherwise run dry. :func:`copy_to_device` is the copy itself: it records the fence on the
stream the copies were enqueued on (the current stream of the target device), and optionally
turns ``u8`` pixels into the daemon's normalised floats on the device.

The fence type is a protocol (``query()`` / ``synchronize()``): ``torch.cuda.Event`` and CuPy's
``Event`` both fit, and tests inject a fake that completes when the test says so.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:
    from .layout import RingLayout


class PixelLayout(Protocol):
    """What :func:`normalize_images` reads of a ring's layout: a :class:`RingLayout` fits."""

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of the daemon's ``normalize`` (header §5.1)."""

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel std of the daemon's ``normalize``; all 0 without it."""

    @property
    def nhwc(self) -> bool:
        """True when images are ``[B, H, W, C]`` rather than ``[B, C, H, W]``."""


class Fence(Protocol):
    """Something a device completes: a ``torch.cuda.Event`` recorded after a copy."""

    def query(self) -> bool:
        """True once the device has passed the fence (non-blocking)."""
        ...

    def synchronize(self) -> None:
        """Block until the device has passed the fence."""
        ...


class PendingReleases:
    """Releases waiting for their batch's device copies to finish, oldest first.

    Each entry is a slot's ``give_back`` callable with the fences that must complete before it
    may run. Entries retire in any order (a later copy on another stream may finish first);
    :meth:`wait_oldest` blocks on the oldest, which is the one most likely done.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        """An empty queue."""
        self._entries: deque[tuple[tuple[Fence, ...], Callable[[], None]]] = deque()

    def __len__(self) -> int:
        """Slots whose release is still deferred (they stay held: taken, not released)."""
        return len(self._entries)

    def defer(self, fences: tuple[Fence, ...], give_back: Callable[[], None]) -> None:
        """Run ``give_back`` once every fence in ``fences`` has completed."""
        self._entries.append((fences, give_back))

    def retire_completed(self) -> int:
        """Give back every slot whose fences have all completed; returns how many."""
        done = [entry for entry in self._entries if all(f.query() for f in entry[0])]
        for entry in done:
            self._entries.remove(entry)
            entry[1]()
        return len(done)

    def wait_oldest(self) -> bool:
        """Block until the oldest entry's fences complete, then give its slot back.

        Returns False when nothing was pending.
        """
        if not self._entries:
            return False
        fences, give_back = self._entries[0]
        for fence in fences:
            fence.synchronize()
        self._entries.popleft()
        give_back()
        return True

    def drain(self) -> None:
        """Wait for every pending copy and give every slot back (closing a live loader)."""
        while self.wait_oldest():
            pass

    def forget(self) -> None:
        """Drop every entry without giving anything back (the connection is gone: the daemon
        takes the slots back itself, or they belong to another process after a fork)."""
        self._entries.clear()


def normalize_images(x: Any, layout: PixelLayout) -> Any:
    """``u8`` pixels → the daemon's f32 values: ``(x / 255 - mean) / std`` per channel.

    The same operations in the same order as the daemon's f32 writer, so a CPU tensor gives
    bit-identical values and a GPU tensor the same within IEEE rounding of the device. Without
    ``normalize`` in the daemon's config (``std`` all 0) this is ``x / 255``, as the daemon's
    f32 path writes then. Float images are already what the daemon made: returned unchanged.
    """
    import torch

    if x.dtype != torch.uint8:
        return x
    channels = int(x.shape[-1] if layout.nhwc else x.shape[1])
    shape = (1, 1, 1, channels) if layout.nhwc else (1, channels, 1, 1)
    out = x.to(torch.float32).div_(255.0)
    if any(layout.std[:channels]):
        mean = torch.tensor(layout.mean[:channels], dtype=torch.float32, device=x.device)
        std = torch.tensor(layout.std[:channels], dtype=torch.float32, device=x.device)
        out.sub_(mean.view(shape)).div_(std.view(shape))
    return out


def copy_to_device(
    host: dict[str, Any],
    names: tuple[str, ...],
    device: Any,
    *,
    non_blocking: bool,
    normalize: bool,
    layout: RingLayout,
) -> tuple[tuple[Any, ...], Optional[Fence]]:
    """Copy the host tensors ``names`` to ``device``; returns the copies and a fence.

    The fence is a ``torch.cuda.Event`` recorded on the device's *current* stream after the
    copies (``None`` for a CPU target, where the copy is done on return). ``normalize``
    applies :func:`normalize_images` to ``images`` on the device. A CPU target always copies
    (``Tensor.to`` would otherwise return the ring view itself).
    """
    import torch

    target = torch.device(device)
    copies = []
    for name in names:
        tensor = host[name]
        copied = tensor.to(target, non_blocking=non_blocking, copy=target.type == "cpu")
        if normalize and name == "images":
            copied = normalize_images(copied, layout)
        copies.append(copied)
    fence: Optional[Fence] = None
    if target.type == "cuda":
        event = torch.cuda.Event()  # type: ignore[no-untyped-call,unused-ignore]
        event.record(torch.cuda.current_stream(target))
        fence = event
    return tuple(copies), fence


def current_stream_fence() -> Optional[Fence]:
    """A CUDA event on the current stream, or None when CUDA was never initialised here.

    Recorded when a pinned loader releases a batch: every copy the trainer enqueued on that
    stream before the release (``x.cuda(non_blocking=True)`` by hand) has read the slot once
    the event completes.
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call,unused-ignore]
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call,unused-ignore]
    event.record(torch.cuda.current_stream())
    fence: Fence = event
    return fence
