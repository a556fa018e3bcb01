"""Release after device copies (issue: a DMA must never read a recycled slot), without a GPU.

The fence protocol is injected: :class:`FakeFence` completes when the test says so, standing in
for a ``torch.cuda.Event`` recorded after ``batch.cuda()``'s copies.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

import ringfeed
from conftest import MakeWriter, Spawn
from helpers import read_report, wait_until
from ring_writer import FREE, READY
from ringfeed.device import PendingReleases


class FakeFence:
    """A device event: ``query()`` is False until :meth:`complete`; ``synchronize()`` completes
    it (the device finishing the copy while the host waits) and counts the waits."""

    def __init__(self) -> None:
        self.done = False
        self.waits = 0

    def complete(self) -> None:
        self.done = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


# ----- the pending-release queue alone ---------------------------------------------------------


def test_in_order_completion_gives_back_each_slot_once_its_fence_is_done() -> None:
    given: list[str] = []
    pending = PendingReleases()
    a, b = FakeFence(), FakeFence()
    pending.defer((a,), lambda: given.append("a"))
    pending.defer((b,), lambda: given.append("b"))
    assert pending.retire_completed() == 0
    assert given == []
    a.complete()
    assert pending.retire_completed() == 1
    assert given == ["a"]
    b.complete()
    assert pending.retire_completed() == 1
    assert given == ["a", "b"]
    assert len(pending) == 0


def test_out_of_order_completion_retires_the_later_copy_first() -> None:
    given: list[str] = []
    pending = PendingReleases()
    a, b, c = FakeFence(), FakeFence(), FakeFence()
    pending.defer((a,), lambda: given.append("a"))
    pending.defer((b, c), lambda: given.append("bc"))
    c.complete()
    assert pending.retire_completed() == 0  # b, copied on another stream, still runs
    b.complete()
    assert pending.retire_completed() == 1
    assert given == ["bc"]
    assert len(pending) == 1
    assert pending.wait_oldest()
    assert (given, a.waits) == (["bc", "a"], 1)
    assert not pending.wait_oldest()


def test_drain_waits_for_every_copy_and_forget_gives_nothing_back() -> None:
    given: list[int] = []
    pending = PendingReleases()
    fences = [FakeFence() for _ in range(3)]
    for i, fence in enumerate(fences):
        pending.defer((fence,), functools.partial(given.append, i))
    pending.drain()
    assert given == [0, 1, 2]
    assert [f.waits for f in fences] == [1, 1, 1]
    pending.defer((FakeFence(),), lambda: given.append(99))
    pending.forget()
    assert len(pending) == 0
    assert given == [0, 1, 2]


# ----- the loader with fenced batches (in-process reference producer) -------------------------


def test_a_released_batch_keeps_its_slot_until_the_copy_completes(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=4, batches_per_epoch=8, epochs=1)
    for _ in range(3):
        writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        first = loader.next_batch()
        fence = FakeFence()
        first.release_after(fence)
        first.release()
        assert first.released
        with pytest.raises(ringfeed.ReleasedBatchError):
            first.images  # noqa: B018 - released for the trainer at once
        assert writer.held(0, first.slot)  # ...but the DMA may still read it
        assert loader.stats().pending_release == 1
        second = loader.next_batch()  # a READY slot exists: no waiting on the fence
        assert fence.waits == 0
        assert writer.held(0, first.slot)
        fence.complete()
        second.release()
        loader.next_batch()  # retires completed fences first
        assert writer.claimable(0, first.slot)
        assert not writer.held(0, first.slot)
        assert loader.stats().pending_release == 0


def test_a_lane_about_to_run_dry_waits_on_the_oldest_copy(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=3, batches_per_epoch=50, epochs=1)
    writer.start_producing()
    fences: list[FakeFence] = []
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        for batch in loader:
            fence = FakeFence()
            fences.append(fence)
            batch.release_after(fence)  # the device never finishes on its own
            if batch.index == 20:
                break
        # 21 batches through 3 slots: every refill came from waiting on an old copy, oldest
        # first, and never from handing back a slot whose copy was still running.
        assert sum(f.waits for f in fences) >= 21 - 3
        waited = [f.waits for f in fences]
        assert waited == sorted(waited, reverse=True), waited


def test_close_with_copies_in_flight_waits_for_them_then_frees_every_slot(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=4, batches_per_epoch=8, epochs=1)
    for _ in range(3):
        writer.publish(0)
    loader = ringfeed.Loader("t", runtime_dir=runtime_dir, release_previous=False)
    batches = [loader.next_batch() for _ in range(3)]
    fences = [FakeFence() for _ in batches]
    for batch, fence in zip(batches, fences):
        batch.release_after(fence)
    batches[0].release()
    assert writer.held(0, batches[0].slot)
    loader.close()
    assert [f.waits for f in fences] == [1, 1, 1]
    writer.wait_detached(0)  # reclaim: the slots its lane page released are free again
    assert [writer.slot_state(0, b.slot) for b in batches] == [FREE] * 3


def test_a_copy_that_already_completed_releases_at_once(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=4)
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        fence = FakeFence()
        fence.complete()
        batch.release_after(fence)
        batch.release()
        assert writer.claimable(0, batch.slot)
        assert not writer.held(0, batch.slot)


def test_release_after_on_a_released_batch_raises(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer()
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        batch.release()
        with pytest.raises(ringfeed.ReleasedBatchError):
            batch.release_after(FakeFence())


def test_a_killed_trainer_with_copies_in_flight_gets_its_batches_redelivered(
    make_writer: MakeWriter, runtime_dir: Path, spawn: Spawn
) -> None:
    writer = make_writer(slots=4, batches_per_epoch=8, epochs=1)
    for _ in range(3):
        writer.publish(0)
    consumer = spawn("consumer_proc.py", "hold-fenced", "t", runtime_dir, 0, 2)
    held = read_report(consumer)["pending"]
    assert writer.held(0, held[0])
    consumer.kill()
    consumer.wait()
    # The producer's reclaim rules (a dead holder's slots come back READY, redelivered) hold
    # for slots whose release was only deferred.
    wait_until(lambda: all(writer.slot_state(0, s) == READY for s in held), "reclaim")
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        first = loader.next_batch()
        assert first.redelivered


# ----- u8 normalisation (CPU tensors: the same torch code path as on the GPU) -------------------


def test_u8_normalisation_matches_the_daemons_float_formula() -> None:
    torch = pytest.importorskip("torch")
    from ringfeed.device import normalize_images

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    layout = _FakeLayout(mean=(*mean, 0.0), std=(*std, 0.0), nhwc=False)
    pixels = np.arange(2 * 3 * 256, dtype=np.int64) % 256  # every value in every channel
    x = torch.from_numpy(pixels.astype(np.uint8).reshape(2, 3, 16, 16))
    got = normalize_images(x, layout).numpy()
    # src/augment/write.rs `normalised`: (f32(v) / 255 - mean) / std, in f32.
    v = x.numpy().astype(np.float32)
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    want = (v / np.float32(255) - m) / s
    np.testing.assert_array_equal(got, want)

    nhwc = torch.from_numpy(x.numpy().transpose(0, 2, 3, 1).copy())
    got_nhwc = normalize_images(nhwc, layout._replace(nhwc=True)).numpy()
    np.testing.assert_array_equal(got_nhwc, want.transpose(0, 2, 3, 1))

    plain = normalize_images(x, layout._replace(std=(0.0,) * 4)).numpy()
    np.testing.assert_array_equal(plain, v / np.float32(255))


class _FakeLayout(NamedTuple):
    """The part of a ring's layout that ``normalize_images`` reads (``device.PixelLayout``)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    nhwc: bool


class _FakeCudart:
    """torch.cuda.cudart() as far as cuda_pin uses it: registration answers and error reads."""

    def __init__(self, accepted_flags: set[int]) -> None:
        self.accepted_flags = accepted_flags
        self.calls: list[str] = []

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:  # noqa: N802
        self.calls.append(f"register {flags}")
        return 0 if flags in self.accepted_flags else 1  # 1 = cudaErrorInvalidValue

    def cudaGetLastError(self) -> int:  # noqa: N802
        self.calls.append("get last error")
        return 0


def _fake_torch(monkeypatch: pytest.MonkeyPatch, cudart: _FakeCudart) -> None:
    import sys
    import types

    cuda = types.SimpleNamespace(is_available=lambda: True, cudart=lambda: cudart)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))


def test_pinning_a_read_only_ring_asks_for_read_only_registration_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ringfeed import _frameworks

    cudart = _FakeCudart(accepted_flags={0x08})
    _fake_torch(monkeypatch, cudart)
    assert _frameworks.cuda_pin(4096, 8192)
    assert cudart.calls == ["register 8"]  # no refused call, so no error left behind


def test_a_refused_registration_clears_cudas_last_error_before_the_next_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A refused cudaHostRegister leaves cudaErrorInvalidValue as the last error, which torch
    # reports at the caller's next kernel launch ("invalid argument", seen on an H200).
    from ringfeed import _frameworks

    cudart = _FakeCudart(accepted_flags=set())
    _fake_torch(monkeypatch, cudart)
    with pytest.warns(ringfeed.RingfeedWarning, match="cudaHostRegister of the ring failed"):
        assert not _frameworks.cuda_pin(4096, 8192)
    assert cudart.calls == ["register 8", "get last error", "register 0", "get last error"]
