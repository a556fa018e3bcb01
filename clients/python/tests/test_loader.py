"""The Loader against the in-process reference producer: views, release, epochs, waiting,
resume and attach errors."""

from __future__ import annotations

import dataclasses
import os
import pickle
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringfeed
from conftest import MakeWriter
from helpers import in_futex_syscall, wait_until
from ring_writer import FAILED, FINISHED, FREE, PAGE_RELEASED, READY, RingWriter
from ringfeed import loader as loader_module


def test_views_are_zero_copy_and_read_only(make_writer: MakeWriter, runtime_dir: Path) -> None:
    writer = make_writer()
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = next(iter(loader))
        ring = loader.ring
        for name, array in batch.tensors.items():
            address = array.ctypes.data
            assert ring.data_address <= address < ring.data_address + ring.data_bytes, name
            assert address + array.nbytes <= ring.data_address + ring.data_bytes
            assert not array.flags.writeable
            assert not array.flags.owndata
        with pytest.raises(ValueError, match="read-only"):
            batch.images[0] = 1.0
        slot_offset = writer.data_offset + batch.slot * writer.slot_stride
        expected = np.ndarray((4,), "<i8", buffer=writer.mem, offset=slot_offset + 3136)
        assert np.shares_memory(batch.sample_ids, batch.sample_ids)
        np.testing.assert_array_equal(batch.sample_ids, expected)


def test_batches_carry_the_producers_content_in_order(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(batches_per_epoch=3, epochs=2)
    writer.start_producing()
    seen = []
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        for _ in range(2):
            for batch in loader:
                np.testing.assert_array_equal(
                    batch.sample_ids, writer.sample_ids(0, batch.epoch, batch.index)
                )
                np.testing.assert_array_equal(batch.labels, batch.sample_ids % 10)
                assert batch.images.shape == (4, 3, 8, 8)
                assert batch.images.dtype == np.float32
                seen.append((batch.epoch, batch.index, batch.seq, batch.redelivered))
    assert seen == [(e, i, 1 + 3 * e + i, False) for e in range(2) for i in range(3)]


def test_one_for_loop_is_one_epoch_and_len_is_batches_per_epoch(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(batches_per_epoch=5, epochs=3)
    writer.start_producing()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        assert len(loader) == 5
        epochs = [[(b.epoch, b.index) for b in loader] for _ in range(3)]
        assert epochs == [[(e, i) for i in range(5)] for e in range(3)]
        assert [b.index for b in loader] == []  # end of stream: FINISHED and nothing ready
        assert writer.get("I", 44) == FINISHED


def test_break_keeps_the_cursor(make_writer: MakeWriter, runtime_dir: Path) -> None:
    writer = make_writer(batches_per_epoch=4, epochs=1)
    writer.start_producing()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        for batch in loader:
            if batch.index == 1:
                break
        assert [b.index for b in loader] == [2, 3]


def test_release_frees_the_slot_and_invalidates_the_batch(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer()
    writer.publish(0)
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        iterator = iter(loader)
        first = next(iterator)
        kept = first.images  # a view obtained before release still exists afterwards
        assert writer.held(0, first.slot)
        assert writer.pages[0].taken_seq(first.slot) == first.seq  # recorded in its lane page
        assert writer.get("I", writer.consumer_table) == os.getpid()
        second = next(iterator)  # release_previous: the first batch is released now
        assert first.released
        assert writer.claimable(0, first.slot)
        assert not writer.held(0, first.slot)
        assert writer.page_field(0, PAGE_RELEASED) == 1  # the lane page's released
        for access in (
            lambda: first.images,
            lambda: first.labels,
            lambda: first.tensors,
            lambda: first["sample_ids"],
            first.torch,
        ):
            with pytest.raises(ringfeed.ReleasedBatchError):
                access()
        assert kept.shape == (4, 3, 8, 8)
        with second:
            assert writer.held(0, second.slot)
        assert second.released
        assert writer.claimable(0, second.slot)
        second.release()  # idempotent
        assert writer.page_field(0, PAGE_RELEASED) == 2


def test_holding_several_batches_and_releasing_out_of_order(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=4, batches_per_epoch=8, epochs=1)
    for _ in range(4):
        writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir, release_previous=False, max_held=3) as ld:
        held = [ld.next_batch() for _ in range(3)]
        assert [b.index for b in held] == [0, 1, 2]
        assert all(writer.held(0, b.slot) for b in held)
        with pytest.raises(ringfeed.RingfeedError, match="already holding 3"):
            ld.next_batch()
        held[1].release()
        assert writer.claimable(0, held[1].slot)
        assert held[0].sample_ids.tolist() == writer.sample_ids(0, 0, 0).tolist()
        fourth = ld.next_batch()
        assert fourth.index == 3
        assert ld.stats().held == 3


def test_holding_every_slot_is_refused_instead_of_deadlocking(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(slots=2, batches_per_epoch=8, epochs=1)
    writer.start_producing()
    with ringfeed.Loader("t", runtime_dir=runtime_dir, release_previous=False) as loader:
        loader.next_batch()
        loader.next_batch()
        with pytest.raises(ringfeed.RingfeedError, match="limit 2"):
            loader.next_batch()


def test_a_waiting_consumer_is_woken_by_the_futex(
    make_writer: MakeWriter, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a 60 s wait slice only a FUTEX_WAKE can deliver the batch before the deadline.
    monkeypatch.setattr(loader_module, "WAIT_SLICE_S", 60.0)
    writer = make_writer()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        got: list[ringfeed.Batch] = []
        native_id: list[int] = []

        def consume() -> None:
            native_id.append(threading.get_native_id())
            got.append(loader.next_batch())

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        wait_until(lambda: bool(native_id), "consumer thread start")
        wait_until(lambda: in_futex_syscall(native_id[0]), "consumer blocked in FUTEX_WAIT")
        writer.publish(0)
        thread.join(timeout=10)
        assert not thread.is_alive(), "consumer was not woken by the publish"
        assert got[0].index == 0
        assert loader.stats().wait_ns > 0


def test_timeout_raises_ring_timeout(make_writer: MakeWriter, runtime_dir: Path) -> None:
    make_writer()
    with ringfeed.Loader("t", runtime_dir=runtime_dir, timeout=0.2) as loader:
        with pytest.raises(ringfeed.RingTimeout):
            loader.next_batch()
        stats = loader.stats()
        assert 0 < stats.wait_share <= 1
    # Counts and nanoseconds are integers as the ring keeps them; seconds are derived.
    fields = dataclasses.asdict(stats)
    assert all(type(value) is int for value in fields.values()), fields
    # Blocked time is the 0.2 s timeout less the scans between wait slices (the deadline is
    # set before the first scan), so a little under 0.2 s, and never more than the wall time.
    assert 180_000_000 <= stats.wait_ns <= stats.wall_ns
    assert stats.wait_s == stats.wait_ns / 1e9
    assert (stats.taken, stats.held, stats.pending_release) == (0, 0, 0)


def test_stopped_producer_raises_producer_gone(make_writer: MakeWriter, runtime_dir: Path) -> None:
    writer = make_writer()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        writer.stop()
        with pytest.raises(ringfeed.ProducerGone, match="stopped") as err:
            loader.next_batch()
    assert (err.value.reason, err.value.pid) == ("stopped", os.getpid())
    # The attributes survive a pickle (a DataLoader worker hands errors to its parent).
    copy = pickle.loads(pickle.dumps(err.value))
    assert (str(copy), copy.reason, copy.pid) == (str(err.value), "stopped", os.getpid())


def test_failed_producer_raises_producer_gone_with_its_reason(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        writer.stop(FAILED)
        with pytest.raises(ringfeed.ProducerGone, match="failed") as err:
            loader.next_batch()
    assert (err.value.reason, err.value.pid) == ("failed", os.getpid())


def test_state_dict_and_resume(make_writer: MakeWriter, runtime_dir: Path) -> None:
    writer = make_writer(batches_per_epoch=4, epochs=3)
    writer.start_producing()
    loader = ringfeed.Loader("t", runtime_dir=runtime_dir)
    assert loader.state_dict()["epoch"] == 0
    taken = [(b.epoch, b.index) for _, b in zip(range(3), loader)]
    assert taken == [(0, 0), (0, 1), (0, 2)]
    state = loader.state_dict()
    assert state == {"epoch": 0, "index": 3, "lane": 0, "generation": writer.generation}
    loader.close()
    writer.wait_detached(0)
    # This producer publishes no fingerprint (like one before 1.3): the state resumes by
    # batch index, and says that it could not be checked.
    no_fingerprint = pytest.warns(ringfeed.RingfeedWarning, match="has no fingerprint")
    with no_fingerprint, ringfeed.Loader("t", runtime_dir=runtime_dir, resume=state) as resumed:
        batch = resumed.next_batch()
        assert (batch.epoch, batch.index) == (0, 3)
        assert batch.last_of_epoch
        with pytest.warns(ringfeed.RingfeedWarning, match="has no fingerprint"):
            resumed.load_state_dict({"epoch": 2, "index": 1})
        assert [(b.epoch, b.index) for b in resumed] == [(2, 1), (2, 2), (2, 3)]
        assert resumed.state_dict()["epoch"] == 3


def test_attach_errors_carry_the_reason(make_writer: MakeWriter, runtime_dir: Path) -> None:
    make_writer(lanes=2)
    with pytest.raises(ringfeed.AttachError, match="out of range"):
        ringfeed.Loader("t", 5, runtime_dir=runtime_dir)
    with (
        ringfeed.Loader("t", 1, runtime_dir=runtime_dir),
        pytest.raises(ringfeed.AttachError, match=f"pid {os.getpid()}"),
    ):
        ringfeed.Loader("t", 1, runtime_dir=runtime_dir)
    with pytest.raises(ringfeed.AttachError, match="cannot connect"):
        ringfeed.Loader("absent", runtime_dir=runtime_dir, wait_for_producer=0)
    for bad in ("", ".hidden", "a/b", "x" * 33, "sp ace", "nul\0"):
        with pytest.raises(ringfeed.AttachError, match="invalid ring name") as err:
            ringfeed.Loader(bad, runtime_dir=runtime_dir)
        assert err.value.code == "client"
        assert isinstance(err.value, ValueError)


def test_argument_mistakes_are_value_or_type_errors(
    runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Checked before anything is connected: no producer needed.
    values: list[tuple[dict[str, Any], str]] = [
        ({"lane": -1}, "lane must be >= 0"),
        ({"max_held": 0}, "max_held must be >= 1"),
        ({"resume": {"epoch": -1, "index": 0}}, r"'epoch' must be in 0..2\*\*64-1"),
        ({"resume": {"epoch": 0, "index": 0, "fingerprint": {"x": float("nan")}}}, "not JSON"),
    ]
    for options, message in values:
        with pytest.raises(ringfeed.ArgumentError, match=message) as err:
            ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0, **options)
        assert isinstance(err.value, ValueError)
        assert isinstance(err.value, ringfeed.RingfeedError)
        assert not isinstance(err.value, TypeError), options
    types: list[tuple[dict[str, Any], str]] = [
        ({"resume": [0, 0]}, "resume must be a dict"),
        ({"resume": {"epoch": "0", "index": 0}}, "resume needs integer 'epoch'"),
        ({"resume": {"epoch": 0, "index": 0, "fingerprint": "abc"}}, "fingerprint' must be"),
    ]
    for options, message in types:
        with pytest.raises(ringfeed.ArgumentTypeError, match=message) as err:
            ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0, **options)
        assert isinstance(err.value, TypeError)
        assert isinstance(err.value, ringfeed.ArgumentError)
    monkeypatch.setenv("LOCAL_RANK", "one")
    with pytest.raises(ValueError, match="LOCAL_RANK='one' is not an integer"):
        ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("WORLD_SIZE", "4x")
    with pytest.raises(ringfeed.ArgumentError, match="WORLD_SIZE='4x' is not an integer"):
        ringfeed.Loader("t", runtime_dir=runtime_dir, wait_for_producer=0)


def test_lane_comes_from_local_rank(
    make_writer: MakeWriter, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_writer(lanes=3)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(runtime_dir))
    with ringfeed.Loader("t") as loader:
        assert loader.lane == 2
        assert ringfeed.info(runtime_dir / "t.sock")["lanes"][2]["consumer_pid"] == os.getpid()


def test_unsafe_runtime_dirs_are_refused(make_writer: MakeWriter, runtime_dir: Path) -> None:
    make_writer()
    runtime_dir.chmod(0o750)
    with pytest.raises(ringfeed.AttachError, match="mode 750"):
        ringfeed.Loader("t", runtime_dir=runtime_dir)
    runtime_dir.chmod(0o700)
    link = runtime_dir.with_name(runtime_dir.name + "-link")
    link.symlink_to(runtime_dir)
    try:
        with pytest.raises(ringfeed.AttachError, match="symlink"):
            ringfeed.Loader("t", runtime_dir=link)
    finally:
        link.unlink()
    with pytest.raises(ringfeed.AttachError, match="not a directory"):
        ringfeed.Loader("t", runtime_dir=runtime_dir / "t.lock")


def test_wait_for_producer_retries_until_it_answers(runtime_dir: Path) -> None:
    writer = RingWriter("late", runtime_dir)
    timer = threading.Timer(0.3, writer.serve)
    timer.start()
    try:
        with ringfeed.Loader("late", runtime_dir=runtime_dir, wait_for_producer=10) as loader:
            assert loader.generation == writer.generation
    finally:
        timer.join()
        writer.stop()


def test_a_ready_batch_is_delivered_to_the_next_consumer_after_close(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer()
    for _ in range(3):
        writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir, release_previous=False) as loader:
        loader.next_batch()
    writer.wait_detached(0)
    assert [writer.slot_state(0, s) for s in range(3)] == [FREE, READY, READY]
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        assert (batch.index, batch.redelivered) == (1, False)


def test_pin_without_cuda_warns_once_and_carries_on(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer()
    writer.publish(0)
    with pytest.warns(ringfeed.RingfeedWarning, match="unpinned"):
        loader = ringfeed.Loader("t", runtime_dir=runtime_dir, pin=True)
    with loader:
        assert loader.next_batch().index == 0


def test_torch_tensors_share_the_ring_memory(make_writer: MakeWriter, runtime_dir: Path) -> None:
    torch = pytest.importorskip("torch")
    writer = make_writer()
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        x, y = batch.torch()
        assert isinstance(x, torch.Tensor)
        assert x.data_ptr() == batch.images.ctypes.data
        assert y.dtype == torch.int64
        assert torch.equal(y, torch.as_tensor(batch.labels.copy()))


def test_jax_arrays_are_copies(make_writer: MakeWriter, runtime_dir: Path) -> None:
    pytest.importorskip("jax")
    writer = make_writer()
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        x, y = batch.jax()
        np.testing.assert_array_equal(np.asarray(y), batch.labels)
        assert x.shape == batch.images.shape


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype"),
    [("u8", np.uint8), ("i32", np.int32), ("f16", np.float16), ("bf16", np.uint16)],
)
def test_every_image_dtype_has_a_numpy_view(
    make_writer: MakeWriter, runtime_dir: Path, dtype: str, numpy_dtype: type
) -> None:
    writer = make_writer(image_dtype=dtype, image_shape=(5, 6, 3))
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        assert loader.layout.tensors[0].dtype_name == dtype
        images = loader.next_batch().images
        assert images.dtype == numpy_dtype
        assert images.shape == (4, 5, 6, 3)


def test_next_batch_raises_stop_iteration_at_the_end_of_the_stream(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    writer = make_writer(batches_per_epoch=2, epochs=1)
    writer.start_producing()
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        assert loader.state_dict()["index"] == 0
        assert [loader.next_batch().index for _ in range(2)] == [0, 1]
        with pytest.raises(StopIteration):
            loader.next_batch()


def test_torch_bf16_is_a_zero_copy_bfloat16_view(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    torch = pytest.importorskip("torch")
    writer = make_writer(image_dtype="bf16")
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        batch = loader.next_batch()
        (x,) = batch.torch("images")
        assert x.dtype == torch.bfloat16
        assert x.data_ptr() == batch.images.ctypes.data
        assert batch.torch("images")[0] is not x  # fresh aliases, not the cached tensor


def test_a_producer_before_1_3_cannot_be_rank_checked_and_marks_no_padding(
    make_writer: MakeWriter, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference writer leaves header offset 156 (world_size) and the lane ranks zero, as a
    # producer before 1.3 did, and writes no `valid` tensor.
    writer = make_writer()
    writer.publish(0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.warns(ringfeed.RingfeedWarning, match="cannot be checked"):
        loader = ringfeed.Loader("t", runtime_dir=runtime_dir)
    with loader:
        assert loader.layout.world_size == 0
        assert loader.ring.lane_rank(0) is None
        batch = loader.next_batch()
        assert batch.valid.tolist() == [1] * batch.count
        assert batch.valid_count == batch.count
        state = loader.state_dict()
        assert "fingerprint" not in state
        assert "sample" not in state
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(ringfeed.RingfeedError, match="WORLD_SIZE='eight'"):
        ringfeed.Loader("t", runtime_dir=runtime_dir)
