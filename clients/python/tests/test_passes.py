"""Validation passes on demand, training and validation rings in one daemon, and the end of a
finished ring, against the real ``ringfeed serve`` binary on the bundled sample dataset (96
samples in two tar shards). Skipped, with the reason, when the binary is missing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

import ringfeed
from conftest import Spawn
from helpers import read_line, wait_until
from ringfeed.runtime import socket_path
from test_daemon import BINARY, REPO, SKIP_REASON, DaemonProcess, StartDaemon, started_daemons

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

SHARDS = str(REPO / "data" / "sample" / "shard-{000000..000001}.tar")
SAMPLES = 96


def ring_config(
    path: Path,
    name: str,
    *,
    on_demand: bool,
    batch: int = 16,
    lanes: int = 1,
    slots: int = 2,
    epochs: int = 0,
    shuffle: str = "none",
    threads: int = 2,
) -> Path:
    """A configuration file for one ring over the sample shards (validation-style transforms,
    u8 output, small images)."""
    sampling = f'shuffle = "{shuffle}"\ndrop-last = false\nseed = 5\n'
    sampling += "on-demand = true\n" if on_demand else f"epochs = {epochs}\n"
    path.write_text(
        f'[source]\nkind = "tar"\nshards = ["{SHARDS}"]\n'
        f"[sampling]\n{sampling}"
        f"[batch]\nsize = {batch}\n"
        "[augment]\nresize = { size = 40 }\ncenter-crop = { size = 32 }\n"
        'output = { dtype = "u8", layout = "nchw" }\n'
        f'[ring]\nname = "{name}"\nlanes = {lanes}\nslots-per-lane = {slots}\n'
        f"[workers]\nthreads = {threads}\nstatus-interval-s = 60\n"
    )
    return path


class MultiDaemon(DaemonProcess):
    """``ringfeed serve --config a.toml --config b.toml …``: one daemon, several rings."""

    def __init__(
        self, runtime_dir: Path, log: Path, *configs: Path, extra: tuple[str, ...] = ()
    ) -> None:
        args: list[str] = [str(BINARY), "serve", *extra]
        for config in configs:
            args += ["--config", str(config)]
        super().__init__(runtime_dir, log, args)

    def loader(self, ring: str, lane: int = 0, **options: Any) -> ringfeed.Loader:
        """Attach to ``lane`` of ``ring`` (several rings: the caller names the one)."""
        return self.attach(ring, lane, **options)


class StartMulti(Protocol):
    """The ``multi`` fixture: starts a :class:`MultiDaemon` on ``configs``, killed at
    teardown."""

    def __call__(self, *configs: Path, extra: tuple[str, ...] = ()) -> MultiDaemon: ...


@pytest.fixture
def multi(runtime_dir: Path, tmp_path: Path) -> Iterator[StartMulti]:
    started: list[MultiDaemon] = []

    def start(*configs: Path, extra: tuple[str, ...] = ()) -> MultiDaemon:
        d = MultiDaemon(runtime_dir, tmp_path / f"multi{len(started)}.log", *configs, extra=extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


@pytest.fixture
def serve(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    yield from started_daemons(runtime_dir, tmp_path)


def member_bytes(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """The contents of a regular file in ``tar``."""
    file = tar.extractfile(member)
    assert file is not None, f"{member.name} is not a regular file"
    return file.read()


def one_pass(loader: ringfeed.Loader) -> tuple[list[int], list[int], list[int]]:
    """(sample ids, labels, first byte of each image) of one ``for`` over ``loader``."""
    ids: list[int] = []
    labels: list[int] = []
    pixels: list[int] = []
    for batch in loader:
        ids += batch.sample_ids.tolist()
        labels += batch.labels.tolist()
        pixels += [int(batch.images[row].sum()) for row in range(len(batch.sample_ids))]
    return ids, labels, pixels


def test_two_passes_yield_every_sample_once_in_the_same_order(
    multi: StartMulti, tmp_path: Path
) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=10)
    daemon = multi(val)
    with daemon.loader("val") as loader:
        assert loader.layout.on_demand
        assert len(loader) == 10  # ceil(96 / 10), the last batch padded
        first = one_pass(loader)
        second = one_pass(loader)
        assert len(first[0]) == 100
        # Every sample once (the 4 padding rows repeat the first samples of the pass).
        assert sorted(set(first[0])) == list(range(SAMPLES))
        assert first[0][:SAMPLES] == list(range(SAMPLES))  # shuffle = "none": dataset order
        assert second == first  # same ids, labels and pixels, in the same order
        assert len(loader) == 10  # len() stays true between passes
        described = loader.describe(np.array(first[0] * 2))  # 200 ids: several requests
        assert [d["id"] for d in described] == first[0] * 2
        assert described[95]["member"] == "sample_000095.jpg"
        assert described[95]["shard"].endswith("shard-000001.tar")
        assert loader.classes == (REPO / "data" / "sample" / "classes.txt").read_text().split()


def test_nothing_is_produced_until_a_pass_is_asked_for(multi: StartMulti, tmp_path: Path) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=10)
    daemon = multi(val)
    with daemon.loader("val") as loader:
        time.sleep(0.5)  # the daemon had every chance to fill the lane; it must not have
        assert loader.ring.lane_stats(0)["published"] == 0
        ids, _, _ = one_pass(loader)
        assert sorted(set(ids)) == list(range(SAMPLES))
        published = loader.ring.lane_stats(0)["published"]
        assert published == 10
        time.sleep(0.3)
        assert loader.ring.lane_stats(0)["published"] == published  # idle between passes


def test_a_second_pass_asked_for_mid_pass_starts_from_the_first_batch(
    multi: StartMulti, tmp_path: Path
) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=8, slots=3)
    daemon = multi(val)
    with daemon.loader("val") as loader:
        full = one_pass(loader)[0]
        partial = []
        for batch in loader:  # abandon a pass after 3 batches (the ring holds more of it)
            partial += batch.sample_ids.tolist()
            if len(partial) >= 24:
                break
        assert partial == full[:24]
        again = one_pass(loader)[0]  # stale batches of the abandoned pass are skipped
        assert again == full


def test_a_consumer_killed_mid_pass_leaves_a_whole_pass_for_the_next(
    multi: StartMulti, tmp_path: Path, spawn: Spawn, runtime_dir: Path
) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=8, slots=3)
    daemon = multi(val)
    with daemon.loader("val") as probe:
        full = one_pass(probe)[0]
    child = spawn("consumer_proc.py", "hold", "val", runtime_dir, 0, 2)
    assert '"held"' in read_line(child)  # two batches of a pass taken, the pass under way
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    with daemon.loader("val", wait_for_producer=5) as loader:
        assert one_pass(loader)[0] == full
        assert one_pass(loader)[0] == full


def test_two_lanes_ask_for_passes_at_once(multi: StartMulti, tmp_path: Path) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=8, lanes=2)
    daemon = multi(val)
    a, b = daemon.loader("val", 0), daemon.loader("val", 1)
    try:
        ita, itb = iter(a), iter(b)  # both passes asked for before either is read
        ids_a = [i for batch in ita for i in batch.sample_ids.tolist()]
        ids_b = [i for batch in itb for i in batch.sample_ids.tolist()]
        assert len(ids_a) == len(ids_b) == 48
        assert not set(ids_a) & set(ids_b)
        assert sorted(ids_a + ids_b) == list(range(SAMPLES))
        assert [i for batch in a for i in batch.sample_ids.tolist()] == ids_a
    finally:
        a.close()
        b.close()


def test_a_second_consumer_of_a_lane_in_a_pass_is_refused(
    multi: StartMulti, tmp_path: Path
) -> None:
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=8)
    daemon = multi(val)
    with daemon.loader("val") as loader:
        it = iter(loader)
        next(it)
        with pytest.raises(ringfeed.AttachError, match="held by live consumer"):
            ringfeed.Loader("val", 0, runtime_dir=daemon.runtime_dir)
        rest: list[int] = []
        while True:  # the same pass goes on (a new `for` would ask for a new one)
            try:
                rest += next(it).sample_ids.tolist()
            except StopIteration:
                break
        assert len(rest) == 96 - 8


def test_one_daemon_serves_train_and_val_from_one_pool(multi: StartMulti, tmp_path: Path) -> None:
    train = ring_config(
        tmp_path / "train.toml", "train", on_demand=False, batch=8, shuffle="global", threads=2
    )
    val = ring_config(tmp_path / "val.toml", "val", on_demand=True, batch=12, threads=3)
    daemon = multi(train, val)
    with daemon.loader("train") as t, daemon.loader("val") as v:
        first_pass = one_pass(v)[0]
        assert sorted(set(first_pass)) == list(range(SAMPLES))
        # Training keeps being served while a validation pass runs: alternate the two.
        train_it = iter(t)
        train_ids: list[int] = []
        val_ids: list[int] = []
        for batch in v:
            val_ids += batch.sample_ids.tolist()
            train_ids += next(train_it).sample_ids.tolist()
        assert val_ids == first_pass
        assert len(train_ids) == 8 * 8
        info = ringfeed.info(socket_path("train", daemon.runtime_dir))
        assert info["daemon_rings"] == ["train", "val"]
    log = daemon.stderr()
    # One pool: both banners name it (the larger of the two [workers] threads).
    assert "ring 'train'" in log
    assert "ring 'val'" in log
    assert log.count("3 workers shared by rings train, val") == 2, log


def test_several_configs_refuse_per_ring_flags_and_equal_names(
    tmp_path: Path, runtime_dir: Path
) -> None:
    a = ring_config(tmp_path / "a.toml", "same", on_demand=False)
    b = ring_config(tmp_path / "b.toml", "same", on_demand=True)
    env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime_dir)}
    run = [str(BINARY), "serve", "--config", str(a), "--config", str(b)]
    out = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "name the ring 'same'" in out.stderr
    out = subprocess.run(
        [*run, "--batch-size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "--batch-size shapes one ring" in out.stderr


def test_a_finished_ring_ends_iteration_with_a_reason_and_len_zero(
    serve: StartDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = serve("--batch-size", 32, "--epochs", 1, "--workers", 2, "--slots-per-lane", 3)
    with daemon.loader() as loader:
        assert len(loader) == 3
        assert sum(1 for _ in loader) == 3
        wait_until(lambda: loader.ring.producer_state == 2, "the ring to finish")
        with caplog.at_level(logging.WARNING, logger="ringfeed"):
            assert list(loader) == []  # ends on StreamFinished, not an empty epoch in silence
            with pytest.raises(ringfeed.StreamFinished, match=r"has finished.*1 epoch"):
                next(iter(loader))
        assert sum("has finished" in r.getMessage() for r in caplog.records) == 1  # logged once
        assert len(loader) == 0
    with daemon.loader() as fresh:  # a fresh loader on the finished ring: nothing left, says so
        assert len(fresh) == 0
        with pytest.raises(ringfeed.StreamFinished):
            next(iter(fresh))


def test_from_epoch_start_and_restart_epoch_see_a_whole_epoch(serve: StartDaemon) -> None:
    daemon = serve(
        "--batch-size", 8, "--epochs", 3, "--workers", 2, "--slots-per-lane", 2, "--seed", 9
    )
    with daemon.loader() as first:
        epoch0 = [i for b in first for i in b.sample_ids.tolist()]
        it = iter(first)
        partial = [next(it).sample_ids.tolist() for _ in range(3)]
        assert first.state_dict()["epoch"] == 1
        assert first.state_dict()["index"] == 3
        first.restart_epoch()
        epoch1 = [i for b in first for i in b.sample_ids.tolist()]
        assert epoch1[:24] == [i for ids in partial for i in ids]
        assert sorted(epoch1) == sorted(epoch0)
        assert len(epoch1) == SAMPLES
        it = iter(first)
        next(it)
        next(it)
    with daemon.loader(from_epoch_start=True) as fresh:
        assert fresh.state_dict()["index"] == 0
        again = [i for b in fresh for i in b.sample_ids.tolist()]
        assert len(again) == SAMPLES
        assert fresh.epoch == 3


def _imagefolder_rule(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's ``ImageFolder`` rule (``find_classes`` + ``make_dataset``), re-implemented:
    class directories sorted by name; per class, ``os.walk``'s directories sorted by path
    string, each one's files sorted, kept by image extension (case-insensitive)."""
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            for file in sorted(files):
                if file.lower().endswith(extensions):
                    samples.append((os.path.join(dirpath, file), label))
    return classes, samples


def _torchvision_order(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """torchvision's own ``ImageFolder`` order when it is installed (checking the
    re-implementation against it), else the re-implementation."""
    rule = _imagefolder_rule(root)
    try:
        from torchvision.datasets import ImageFolder  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return rule
    folder = ImageFolder(str(root))
    real = list(folder.classes), [(str(p), int(c)) for p, c in folder.samples]
    assert real == rule
    return real


def test_classes_and_describe_name_imagefolder_classes_and_paths(
    multi: StartMulti, tmp_path: Path
) -> None:
    root = tmp_path / "folder"
    with tarfile.open(REPO / "data" / "sample" / "shard-000000.tar") as tar:
        jpegs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:9]
        layout = {"zebra": 3, "Apple": 2, "mango": 4}  # capital first: byte order, as Python
        # A class's own files come before its subdirectories', and directories sort by path
        # string: "sub-x" before "sub/deeper" ('-' < '/').
        places = ["sub/img9.JPG", "zz.jpg", "sub-x/a.jpeg", "sub/deeper/b.jpg"]
        at = 0
        for name, count in layout.items():
            for k in range(count):
                where = root / name / places[k]
                where.parent.mkdir(parents=True, exist_ok=True)
                where.write_bytes(member_bytes(tar, jpegs[at]))
                at += 1
        (root / "mango" / "notes.txt").write_text("not an image")
    config = tmp_path / "folder.toml"
    config.write_text(
        f'[source]\nkind = "imagefolder"\npath = "{root}"\n'
        '[sampling]\nshuffle = "none"\non-demand = true\n[batch]\nsize = 4\n'
        "[augment]\nresize = { size = 40 }\ncenter-crop = { size = 32 }\n"
        'output = { dtype = "u8", layout = "nchw" }\n[ring]\nname = "folder"\n'
        "[workers]\nthreads = 2\nmax-skip-fraction = 0.5\n"
    )
    daemon = multi(config)
    expected_classes, expected_samples = _torchvision_order(root)
    with daemon.loader("folder") as loader:
        assert loader.classes == expected_classes == ["Apple", "mango", "zebra"]
        assert loader.num_classes == 3
        ids, labels = [], []
        for batch in loader:
            ids += batch.sample_ids.tolist()
            labels += batch.labels.tolist()
        described = loader.describe(ids[:9])
        assert [d["path"] for d in described] == [p for p, _ in expected_samples]
        assert labels[:9] == [c for _, c in expected_samples]
        assert all(d["shard"] is None for d in described)
        assert loader.describe([10_000])[0]["error"].startswith("sample id 10000 is outside")


def test_describe_names_the_original_files_pack_kept(multi: StartMulti, tmp_path: Path) -> None:
    src = tmp_path / "src"
    with tarfile.open(REPO / "data" / "sample" / "shard-000000.tar") as tar:
        jpegs = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:6]
        for k, member in enumerate(jpegs):
            d = src / ("cats" if k % 2 else "dogs")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"photo_{k}.jpg").write_bytes(member_bytes(tar, member))
    out = tmp_path / "packed"
    subprocess.run(
        [str(BINARY), "pack", str(src), str(out), "--samples-per-shard", "4"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    config = tmp_path / "packed.toml"
    config.write_text(
        f'[source]\nkind = "tar"\nshards = ["{out}/shard-*.tar"]\n'
        '[sampling]\nshuffle = "none"\non-demand = true\n[batch]\nsize = 3\n'
        "[augment]\nresize = { size = 40 }\ncenter-crop = { size = 32 }\n"
        'output = { dtype = "u8", layout = "nchw" }\n[ring]\nname = "packed"\n'
        "[workers]\nthreads = 2\n"
    )
    daemon = multi(config)
    with daemon.loader("packed") as loader:
        assert loader.classes == ["cats", "dogs"]
        ids = [i for batch in loader for i in batch.sample_ids.tolist()]
        described = loader.describe(ids)
        assert [d["path"] for d in described] == [
            "cats/photo_1.jpg",
            "cats/photo_3.jpg",
            "cats/photo_5.jpg",
            "dogs/photo_0.jpg",
            "dogs/photo_2.jpg",
            "dogs/photo_4.jpg",
        ]
        assert described[4]["shard"].endswith("shard-000001.tar")
        assert described[0]["member"] == "000000000.jpg"


def test_a_hostile_classes_file_leaves_the_names_unknown(multi: StartMulti, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in (0, 1):
        (shards / f"shard-00000{n}.tar").symlink_to(
            REPO / "data" / "sample" / f"shard-00000{n}.tar"
        )
    (shards / "classes.txt").write_bytes(b"astronaut\ncat\x00\x1b[2J\n" + b"\xff" * 10)
    config = tmp_path / "hostile.toml"
    config.write_text(
        f'[source]\nkind = "tar"\nshards = ["{shards}/shard-*.tar"]\n'
        '[sampling]\nshuffle = "none"\non-demand = true\n[batch]\nsize = 32\n'
        "[augment]\nresize = { size = 40 }\ncenter-crop = { size = 32 }\n"
        'output = { dtype = "u8", layout = "nchw" }\n[ring]\nname = "hostile"\n'
        "[workers]\nthreads = 2\n"
    )
    daemon = multi(config)
    with daemon.loader("hostile") as loader:
        assert loader.classes is None
        assert loader.num_classes is None
        assert sum(len(b.sample_ids) for b in loader) == 96  # served all the same
    assert "class names refused" in daemon.stderr()
    assert "classes.txt" in daemon.stderr()


def _toml_readable() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(m) is not None for m in ("tomllib", "tomli"))


@pytest.mark.skipif(not _toml_readable(), reason="needs Python 3.11+ (tomllib) or tomli")
def test_serve_from_python_hosts_train_and_val_rings(
    tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RINGFEED_BIN", str(BINARY))
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(runtime_dir))
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    train = ring_config(tmp_path / "train.toml", "py-train", on_demand=False, batch=8, epochs=2)
    val = ring_config(tmp_path / "val.toml", "py-val", on_demand=True, batch=12)
    with pytest.raises(ringfeed.ArgumentError, match="takes no epochs"):
        ringfeed.serve([train, val], epochs=3)
    with ringfeed.serve([train, val]) as daemon:
        assert daemon.names == ["py-train", "py-val"]
        with daemon.loader() as t, daemon.loader(ring="py-val") as v:
            assert t.name == "py-train"
            assert len(t) == 12
            assert v.layout.on_demand
            assert sorted(set(one_pass(v)[0])) == list(range(SAMPLES))
            assert sum(1 for _ in t) == 12
        with pytest.raises(ringfeed.ArgumentError, match="serves rings"):
            daemon.loader(ring="nope")
