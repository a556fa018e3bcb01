"""The ring across real processes: producer and consumer deaths, two lanes at once, Ctrl-C,
and a producer restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import ringfeed
from conftest import MakeWriter, Spawn
from helpers import in_futex_syscall, in_futex_syscall_of, read_line, read_report, wait_until
from ring_writer import READY

HERE = Path(__file__).parent


def start_writer(spawn: Spawn, name: str, directory: Path, *args: object) -> subprocess.Popen[str]:
    process = spawn("ring_writer.py", "--name", name, "--dir", directory, *args)
    line = read_line(process)
    assert line.startswith("READY")
    return process


def test_killed_producer_raises_producer_gone_within_a_second(
    spawn: Spawn, runtime_dir: Path
) -> None:
    producer = start_writer(spawn, "p", runtime_dir, "--no-produce")
    with ringfeed.Loader("p", runtime_dir=runtime_dir) as loader:
        outcome: list[tuple[BaseException, float]] = []
        native_id: list[int] = []

        def consume() -> None:
            native_id.append(threading.get_native_id())
            try:
                loader.next_batch()
            except BaseException as err:
                outcome.append((err, time.monotonic()))

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        wait_until(lambda: bool(native_id) and in_futex_syscall(native_id[0]), "consumer wait")
        killed_at = time.monotonic()
        producer.kill()
        thread.join(timeout=10)
        error, raised_at = outcome[0]
        assert isinstance(error, ringfeed.ProducerGone)
        assert (error.reason, error.pid) == ("died", producer.pid)
        assert raised_at - killed_at < 1.0  # the contract (§6): noticed within 1 s


def test_killed_consumer_batches_are_redelivered_in_order(
    make_writer: MakeWriter, spawn: Spawn, runtime_dir: Path
) -> None:
    writer = make_writer(slots=4, batches_per_epoch=8, epochs=1)
    for _ in range(4):
        writer.publish(0)
    consumer = spawn("consumer_proc.py", "hold", "t", runtime_dir, 0, 3)
    held = read_report(consumer)["held"]
    assert [h[:3] for h in held] == [[0, 0, 1], [0, 1, 2], [0, 2, 3]]
    assert sum(writer.held(0, s) for s in range(4)) == 3
    consumer.kill()
    consumer.wait()
    writer.wait_detached(0)
    assert sum(writer.slot_state(0, s) == READY for s in range(4)) == 4
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        again = [loader.next_batch() for _ in range(4)]
        got = [[b.epoch, b.index, b.seq, b.sample_ids.tolist()] for b in again[:3]]
        assert got == held
        assert [b.redelivered for b in again] == [True, True, True, False]
        assert (again[3].index, again[3].seq) == (3, 4)


def test_two_lanes_consumed_by_two_processes(
    make_writer: MakeWriter, spawn: Spawn, runtime_dir: Path
) -> None:
    writer = make_writer(lanes=2, slots=2, batches_per_epoch=5, epochs=2)
    consumers = [spawn("consumer_proc.py", "consume", "t", runtime_dir, lane) for lane in (0, 1)]
    for lane in (0, 1):
        writer.wait_attached(lane)
    writer.start_producing()
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for lane, consumer in enumerate(consumers):
        for epoch in range(2):
            report = read_report(consumer)
            assert report["epoch"] == epoch
            assert [b[:2] for b in report["batches"]] == [[epoch, i] for i in range(5)]
            for _, index, ids in report["batches"]:
                assert ids == writer.sample_ids(lane, epoch, index).tolist()
                per_epoch[epoch].extend(ids)
        assert read_report(consumer) == {"done": True}
        assert consumer.wait(timeout=20) == 0
    for ids in per_epoch.values():  # the lanes are disjoint and cover the dataset
        assert sorted(ids) == list(range(writer.samples))


def test_ctrl_c_while_waiting_leaves_no_held_slot(
    make_writer: MakeWriter, spawn: Spawn, runtime_dir: Path
) -> None:
    writer = make_writer()
    consumer = spawn("consumer_proc.py", "interrupt", "t", runtime_dir, 0)
    assert read_report(consumer) == {"waiting": True}
    wait_until(lambda: in_futex_syscall_of(consumer.pid), "consumer blocked in FUTEX_WAIT")
    consumer.send_signal(signal.SIGINT)
    assert read_report(consumer) == {"interrupted": True, "held": 0}
    assert consumer.wait(timeout=20) == 0
    writer.wait_detached(0)
    writer.publish(0)
    with ringfeed.Loader("t", runtime_dir=runtime_dir) as loader:
        assert loader.next_batch().index == 0


def test_restarted_producer_is_resumed_at_the_cursor(spawn: Spawn, runtime_dir: Path) -> None:
    producer = start_writer(spawn, "r", runtime_dir, "--batches-per-epoch", 6, "--epochs", 2)
    loader = ringfeed.Loader("r", runtime_dir=runtime_dir, wait_for_producer=20)
    with loader:
        first = [(b.epoch, b.index) for _, b in zip(range(4), loader)]
        assert first == [(0, 0), (0, 1), (0, 2), (0, 3)]
        generation = loader.generation
        producer.kill()
        start_writer(spawn, "r", runtime_dir, "--batches-per-epoch", 6, "--epochs", 2)
        # Batches already READY in the dead producer's ring are still valid and come first;
        # once the loader has to wait it re-attaches, resuming the new producer at its cursor.
        assert [(b.epoch, b.index) for b in loader] == [(0, 4), (0, 5)]
        assert [(b.epoch, b.index) for b in loader] == [(1, i) for i in range(6)]
        assert loader.generation != generation  # 4 slots cannot hold the 8 batches read since


def test_a_consumer_refuses_to_attach_to_a_dead_producers_socket(
    spawn: Spawn, runtime_dir: Path
) -> None:
    producer = start_writer(spawn, "d", runtime_dir, "--no-produce")
    producer.kill()
    producer.wait()  # every thread gone, so the listening socket is closed
    with pytest.raises(ringfeed.AttachError, match="cannot connect"):
        ringfeed.Loader("d", runtime_dir=runtime_dir, wait_for_producer=0)


def test_the_in_place_fault_prints_a_python_traceback_and_copy_true_is_writable(
    make_writer: MakeWriter, runtime_dir: Path
) -> None:
    pytest.importorskip("torch")
    writer = make_writer(lanes=2)
    writer.publish(0)
    writer.publish(1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    script = [sys.executable, str(HERE / "consumer_proc.py")]
    crashed = subprocess.run(
        [*script, "torch-write", "t", str(runtime_dir), "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert crashed.returncode == -signal.SIGSEGV
    # faulthandler, turned on by the first zero-copy torch(): the line that wrote is named.
    assert "Segmentation fault" in crashed.stderr, crashed.stderr
    assert 'consumer_proc.py", line' in crashed.stderr, crashed.stderr
    copied = subprocess.run(
        [*script, "torch-copy", "t", str(runtime_dir), "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr
    report = json.loads(copied.stdout.splitlines()[-1])
    assert report == {"copy": report["ring"] + 1.0, "ring": report["ring"]}


def test_an_in_place_torch_write_faults_instead_of_corrupting(
    make_writer: MakeWriter, spawn: Spawn, runtime_dir: Path
) -> None:
    pytest.importorskip("torch")
    writer = make_writer()
    writer.publish(0)
    consumer = spawn("consumer_proc.py", "torch-write", "t", runtime_dir, 0)
    assert read_report(consumer) == {"writing": True}
    assert consumer.wait(timeout=60) == -signal.SIGSEGV
    slot_data = writer.data_offset  # lane 0 slot 0: untouched
    assert writer.mem[slot_data : slot_data + 4] == bytes(4)  # images[0] of sample 0 is 0.0
