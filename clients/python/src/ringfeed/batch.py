"""One batch taken from the ring: zero-copy views of a slot, valid until released."""

from __future__ import annotations

import contextlib
import faulthandler
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

from . import _frameworks
from . import device as _device
from .errors import ArgumentTypeError, ReleasedBatchError
from .layout import SLOT_LAST_OF_EPOCH, SLOT_REDELIVERED

if TYPE_CHECKING:
    from .ring import Ring, TakenSlot


def _traceback_on_segfault() -> None:
    """Turn ``faulthandler`` on (unless the program chose otherwise already): an in-place
    write into a zero-copy tensor then dies with the Python traceback of the line that wrote,
    not a bare SIGSEGV. Once per process; ``faulthandler`` only adds signal handlers for
    fatal signals, which Python would not handle anyway."""
    if not faulthandler.is_enabled():
        # No usable stderr (closed, or not a file): nothing to print the traceback to.
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            faulthandler.enable()


class _Owner(Protocol):
    def _release(self, batch: Batch) -> None: ...


class Batch:
    """A batch held by this process: its slot stays the consumer's (taken, not released, in its
    lane page) until :meth:`release`.

    The tensors are read-only numpy arrays viewing the shared memory (no copy). After
    :meth:`release` the attributes that return data raise :class:`ReleasedBatchError`, but
    arrays (or tensors) obtained *before* still point into the slot, which the producer will
    overwrite: copy whatever you keep past the release.

    A batch refers to its loader weakly: dropping the last reference to the loader detaches
    it at once and releases its batches. A batch whose connection ended unreleased (the
    producer was declared gone and the loader re-attached) or that a ``fork()``ed child
    inherited behaves as released: reading it raises, releasing it does nothing.
    """

    __slots__ = (
        "_fences",
        "_lane",
        "_owner",
        "_released",
        "_released_why",
        "_ring",
        "_views",
        "count",
        "epoch",
        "index",
        "last_of_epoch",
        "redelivered",
        "seq",
        "slot",
    )

    def __init__(self, owner: _Owner, ring: Ring, lane: int, taken: TakenSlot) -> None:
        """Wrap a slot taken by ``owner``; only the loader makes batches."""
        self._owner: weakref.ReferenceType[_Owner] = weakref.ref(owner)
        self._ring = ring
        self._lane = lane
        self._released = False
        self._released_why = "was released"
        self._views: Optional[dict[str, np.ndarray]] = None
        self._fences: list[_device.Fence] = []
        self.slot: int = taken.slot
        """Slot number within the lane."""
        self.seq: int = taken.seq
        """Lane-local sequence number (strictly increasing in publish order)."""
        self.epoch: int = taken.epoch
        """Epoch this batch belongs to."""
        self.index: int = taken.index
        """Batch index within the epoch, for this lane."""
        self.count: int = taken.count
        """Samples in the batch (= batch size; padded batches repeat samples)."""
        self.last_of_epoch: bool = bool(taken.flags & SLOT_LAST_OF_EPOCH)
        """True for the last batch of its epoch in this lane."""
        self.redelivered: bool = bool(taken.flags & SLOT_REDELIVERED)
        """True when a previous consumer of the lane died holding this batch."""

    @property
    def lane(self) -> int:
        """The lane the batch came from."""
        return self._lane

    @property
    def released(self) -> bool:
        """Whether the batch has been released (its data is no longer ours)."""
        return self._released

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        """Every tensor of the schema by name: read-only numpy arrays viewing the ring."""
        if self._released:
            raise ReleasedBatchError(
                f"batch (epoch {self.epoch}, index {self.index}) {self._released_why}; "
                "copy what you keep past release"
            )
        views = self._views
        if views is None:
            arrays = self._ring.slot_arrays(self._lane, self.slot)
            views = {name: array.view() for name, array in arrays.items()}
            self._views = views
        return views

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor called ``name``."""
        tensors = self.tensors
        try:
            return tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in this ring (has {sorted(tensors)})") from None

    @property
    def images(self) -> np.ndarray:
        """The ``images`` tensor (``[B, C, H, W]`` or ``[B, H, W, C]``)."""
        return self["images"]

    @property
    def labels(self) -> np.ndarray:
        """The ``labels`` tensor (``int64 [B]``)."""
        return self["labels"]

    @property
    def sample_ids(self) -> np.ndarray:
        """The ``sample_ids`` tensor: each sample's index in the dataset (``int64 [B]``)."""
        return self["sample_ids"]

    @property
    def weights(self) -> np.ndarray:
        """The ``weights`` tensor (``float32 [B]``, only with selection on): multiply each
        sample's loss by it (1.0, or ``1 / (1 - prune_ratio)`` for kept well-learned samples)."""
        return self["weights"]

    @property
    def targets(self) -> np.ndarray:
        """The ``targets`` tensor (``float32 [B, num_classes]``, only with ``mixup`` / ``cutmix``):
        each row's mixed, label-smoothed soft label, summing to 1 — the target of a soft-target
        cross-entropy (timm's ``SoftTargetCrossEntropy``)."""
        return self["targets"]

    @property
    def valid(self) -> np.ndarray:
        """The ``valid`` tensor (``uint8 [B]``, format 1.3): 1 for a sample's first occurrence
        in the epoch on this job's ranks, 0 for a padding row (``drop-last = false`` repeats
        the epoch's start to fill the last batches). All ones from a producer before 1.3,
        which does not mark padding."""
        tensors = self.tensors
        if "valid" in tensors:
            return tensors["valid"]
        ones = np.ones(self.count, dtype=np.uint8)
        ones.flags.writeable = False
        return ones

    @property
    def valid_count(self) -> int:
        """Rows of this batch that are not padding (the number of ones in :attr:`valid`)."""
        return int(np.count_nonzero(self.valid))

    def torch(
        self,
        *names: str,
        device: Any = None,
        non_blocking: bool = True,
        normalize: bool = False,
        copy: bool = False,
    ) -> tuple[Any, ...]:
        """Torch tensors of the batch, by default ``(images, labels)``.

        Without ``device`` and ``copy``: tensors sharing the ring's memory (no copy).

        .. warning:: They view a **read-only** mapping. An in-place operation on them
           (``x.mul_(0.7)``, ``x += 1``, ``x[:, 0] = 0``, ``torch.nn.functional.relu(x,
           inplace=True)``, mixup written in place) crashes the process with SIGSEGV: torch
           has no read-only tensors, so it cannot raise an error first. The client turns
           Python's ``faulthandler`` on at the first such view, so the crash prints the
           Python traceback of the offending line. Use ``copy=True`` (or an out-of-place op,
           ``x = x * 0.7``) for tensors you modify.

        ``copy=True``: writable copies in ordinary memory, safe to modify and to keep after
        the release. bf16 tensors come out as ``torch.bfloat16``. With ``device``: the same
        as :meth:`to` (copies, and the release waits for them).
        """
        if device is not None:
            return self.to(device, *names, non_blocking=non_blocking, normalize=normalize)
        if normalize:
            raise ArgumentTypeError(
                "normalize=True makes a copy: pass device= (or use batch.to/cuda)"
            )
        views = self._torch_views(names or ("images", "labels"))
        if copy:
            return tuple(view.clone() for view in views)
        _traceback_on_segfault()
        return tuple(view.detach() for view in views)

    def _torch_views(self, names: tuple[str, ...]) -> list[Any]:
        self.tensors  # noqa: B018 - raises ReleasedBatchError after release
        key = ("torch", self._lane, self.slot)
        cache = self._ring.framework_cache.get(key)
        if cache is None:
            arrays = self._ring.slot_arrays(self._lane, self.slot)
            codes = {spec.name: spec.dtype_code for spec in self._ring.layout.tensors}
            cache = _frameworks.torch_slot_tensors(arrays, codes)
            self._ring.framework_cache[key] = cache
        try:
            return [cache[name] for name in names]
        except KeyError as missing:
            raise KeyError(f"no tensor {missing} in this ring (has {sorted(cache)})") from None

    def to(
        self,
        device: Any,
        *names: str,
        non_blocking: bool = True,
        normalize: bool = False,
    ) -> tuple[Any, ...]:
        """Copies of the tensors on ``device`` (default ``(images, labels)``), safe to keep.

        The copies are enqueued on the *current* CUDA stream of ``device`` (inside
        ``with torch.cuda.stream(s):`` that is ``s``), and a CUDA event recorded after them
        becomes a fence of this batch: releasing the batch (explicitly, by ``with``, or by
        the loader's next iteration) hands the slot back only once the event has completed,
        so the daemon can never refill a slot a DMA is still reading. The trainer is not
        blocked by this while the lane has other slots (see the client README).

        ``normalize=True`` turns ``u8`` images into the daemon's normalised f32 values on the
        device (mean/std from the ring's header): ship a quarter of the bytes, normalise on
        the GPU. Float images are returned as they are.
        """
        wanted = names or ("images", "labels")
        host = dict(zip(wanted, self._torch_views(wanted)))
        copies, fence = _device.copy_to_device(
            host,
            wanted,
            device,
            non_blocking=non_blocking,
            normalize=normalize,
            layout=self._ring.layout,
        )
        if fence is not None:
            self._fences.append(fence)
        return copies

    def cuda(
        self,
        *names: str,
        device: Any = None,
        non_blocking: bool = True,
        normalize: bool = False,
    ) -> tuple[Any, ...]:
        """:meth:`to` the current CUDA device (or ``device``): the safe asynchronous copy."""
        return self.to(
            "cuda" if device is None else device,
            *names,
            non_blocking=non_blocking,
            normalize=normalize,
        )

    def release_after(self, fence: _device.Fence) -> None:
        """Tie the slot's release to ``fence`` (``query()`` / ``synchronize()``, e.g. a
        ``torch.cuda.Event`` or a CuPy event recorded after your own copy of this batch)."""
        self.tensors  # noqa: B018 - raises ReleasedBatchError after release
        self._fences.append(fence)

    def jax(self, *names: str) -> tuple[Any, ...]:
        """JAX arrays of the tensors, by default ``(images, labels)``. These are COPIES: JAX
        arrays are immutable, a ring slot is not, so aliasing it would be unsound."""
        tensors = self.tensors
        codes = {spec.name: spec.dtype_code for spec in self._ring.layout.tensors}
        wanted = names or ("images", "labels")
        return tuple(_frameworks.jax_array(tensors[name], codes[name]) for name in wanted)

    def release(self) -> None:
        """Give the slot back to the producer. Idempotent."""
        if not self._released:
            owner = self._owner()
            if owner is None:  # the loader is gone; closing it released this batch
                self._mark_released()
            else:
                owner._release(self)

    def _mark_released(self, why: Optional[str] = None) -> tuple[_device.Fence, ...]:
        """Mark released (``why`` completes the error message of a later read); returns the
        fences the slot's hand-back must wait for."""
        if why is not None and not self._released:
            self._released_why = why
        self._released = True
        self._views = None
        fences = tuple(self._fences)
        self._fences.clear()
        return fences

    def __enter__(self) -> Batch:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return (
            f"<ringfeed.Batch lane={self._lane} epoch={self.epoch} index={self.index} "
            f"seq={self.seq} {state}{' redelivered' if self.redelivered else ''}>"
        )
