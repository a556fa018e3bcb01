"""The feedback loop end to end: the real ``ringfeed serve`` with ``[selection]``, trainers
reporting losses through :meth:`ringfeed.Loader.report`.

The daemon serves the bundled sample (96 photos) at 32x32. Skipped, with the reason, when the
binary is missing (see ``test_daemon.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringfeed
from test_daemon import BINARY, REPO, SKIP_REASON

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

SAMPLES = 96


def config(
    tmp_path: Path,
    *,
    mode: str = "infobatch",
    lanes: int = 1,
    batch: int = 8,
    epochs: int = 8,
    extra: str = "",
) -> Path:
    shards = REPO / "data" / "sample" / "shard-{000000..000001}.tar"
    path = tmp_path / f"selection-{mode}-{lanes}-{batch}.toml"
    path.write_text(
        f"""
[source]
kind = "tar"
shards = ["{shards}"]
[sampling]
seed = 11
drop-last = true
epochs = {epochs}
[batch]
size = {batch}
[augment]
random-resized-crop = {{ size = 32, scale = [0.08, 1.0] }}
horizontal-flip = {{ p = 0.5 }}
rotate = {{ degrees = [-15.0, 15.0], p = 0.5 }}
output = {{ dtype = "u8", layout = "nchw" }}
[ring]
lanes = {lanes}
slots-per-lane = 3
[workers]
threads = 2
[selection]
mode = "{mode}"
{extra}
"""
    )
    return path


class Node:
    """One ``ringfeed serve`` (one node), with its own ring name and state directory."""

    def __init__(self, tmp_path: Path, runtime_dir: Path, name: str, cfg: Path, *args: object):
        self.name, self.runtime_dir = name, runtime_dir
        self.state_dir = tmp_path / f"state-{name}"
        self.log_path = tmp_path / f"{name}.log"
        self.cfg, self.args = cfg, args
        self.process: Any = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(self.runtime_dir)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(BINARY),
                    "serve",
                    "-c",
                    str(self.cfg),
                    "--name",
                    self.name,
                    "--state-dir",
                    str(self.state_dir),
                    *map(str, self.args),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def loader(self, lane: int = 0, **options: Any) -> ringfeed.Loader:
        deadline = time.monotonic() + 60
        while True:
            try:
                return ringfeed.Loader(
                    self.name, lane, runtime_dir=self.runtime_dir, timeout=60, **options
                )
            except ringfeed.AttachError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"daemon not serving; log:\n{self.log()}") from None
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        """A clean stop (SIGTERM), as an operator restarting the daemon does."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0, self.log()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def nodes(tmp_path: Path, runtime_dir: Path) -> Iterator[Any]:
    started: list[Node] = []

    def start(name: str, cfg: Path, *args: object) -> Node:
        node = Node(tmp_path, runtime_dir, name, cfg, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        node.close()


def even_odd(ids: np.ndarray, epoch: int) -> np.ndarray:
    return np.where(ids % 2 == 0, 0.1, 1.0)


def varied(ids: np.ndarray, epoch: int) -> np.ndarray:
    """A loss that differs per sample and epoch, so each plan depends on every report."""
    return ((ids * 7919 + epoch * 104729) % 97) / 97.0 + 0.01


def run_epochs(
    loader: ringfeed.Loader,
    epochs: range,
    loss: Any,
    stop_at: tuple[int, int] | None = None,
    resumed_at: int = 0,
) -> dict[int, list[tuple[int, float]]]:
    """Serve ``epochs``, reporting ``loss(ids, epoch)`` for every batch; returns per epoch the
    (id, weight) pairs in serving order. ``stop_at=(epoch, batches)`` stops early;
    ``resumed_at``: the first epoch starts at that batch index."""
    served: dict[int, list[tuple[int, float]]] = {}
    for epoch in epochs:
        length = len(loader)
        rows = served.setdefault(epoch, [])
        count = 0
        for batch in loader:
            assert batch.epoch == epoch
            ids = batch.sample_ids.copy()
            rows.extend(zip(ids.tolist(), batch.weights.tolist()))
            loader.report(ids, loss(ids, epoch))
            count += 1
            if stop_at == (epoch, count):
                return served
        skipped = resumed_at if epoch == epochs.start else 0
        assert count == length - skipped, f"epoch {epoch}: len() said {length}, served {count}"
    return served


def test_infobatch_prunes_half_the_well_learned_and_anneals(nodes: Any, tmp_path: Path) -> None:
    node = nodes("sel", config(tmp_path))
    with node.loader() as loader:
        assert loader.layout.selection
        assert [t.name for t in loader.layout.tensors] == [
            "images",
            "labels",
            "sample_ids",
            "weights",
            "valid",
        ]
        served = run_epochs(loader, range(8), even_odd)
        assert next(iter(loader), None) is None, "the run ends after 8 epochs"
    first = served[0]
    assert sorted(i for i, _ in first) == list(range(SAMPLES))
    assert {w for _, w in first} == {1.0}
    for epoch in range(1, 7):
        rows = served[epoch]
        ids = [i for i, _ in rows]
        assert len(ids) == len(set(ids)), "each id at most once per epoch"
        odd = {i for i in ids if i % 2}
        even = [i for i in ids if i % 2 == 0]
        assert odd == set(range(1, SAMPLES, 2)), "every above-mean sample stays"
        assert len(even) == SAMPLES // 4, "half the below-mean samples are pruned"
        assert len(rows) == SAMPLES * 3 // 4
        for i, w in rows:
            assert w == (2.0 if i % 2 == 0 else 1.0), (epoch, i, w)
    assert served[1] != served[2], "the random half differs per epoch"
    last = served[7]
    assert sorted(i for i, _ in last) == list(range(SAMPLES))
    assert {w for _, w in last} == {1.0}
    assert "epoch 1: 72 samples served, 24 pruned, 9 batches per lane" in node.log()


def test_resume_with_a_restarted_daemon_serves_the_same_epochs(nodes: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path)
    reference = nodes("ref", cfg)
    with reference.loader() as loader:
        expected = run_epochs(loader, range(8), varied)
    assert any(len(rows) < SAMPLES for rows in expected.values()), "the test must prune"

    node = nodes("rs", cfg)
    with node.loader() as loader:
        before = run_epochs(loader, range(4), varied, stop_at=(3, 4))
        state = loader.state_dict()
        reported = sum(len(rows) for rows in before.values())
    assert (state["epoch"], state["index"]) == (3, 4)
    # Every report reached the daemon before it is stopped (a clean stop saves the scores).
    deadline = time.monotonic() + 20
    while True:
        ev = ringfeed.evaluation(node.name, runtime_dir=node.runtime_dir)
        if ev["reports"]["losses"] >= reported:
            break
        assert time.monotonic() < deadline, "reports did not arrive"
        time.sleep(0.05)
    node.stop()
    assert any(p.name.startswith("epoch-3") for p in node.state_dir.iterdir())
    node.start()
    with node.loader(resume=state) as loader:
        rest = run_epochs(loader, range(3, 8), varied, resumed_at=4)
    for epoch in range(3):
        assert before[epoch] == expected[epoch], epoch
    assert before[3] + rest[3] == expected[3]
    for epoch in range(4, 8):
        assert rest[epoch] == expected[epoch], f"epoch {epoch} differs after the restart"


def test_two_nodes_report_everything_and_decide_identical_plans(nodes: Any, tmp_path: Path) -> None:
    cfg = config(tmp_path, lanes=2, batch=4, epochs=4)
    node0 = nodes("n0", cfg, "--world-size", 4, "--first-rank", 0)
    node1 = nodes("n1", cfg, "--world-size", 4, "--first-rank", 2)
    loaders = [node0.loader(0), node0.loader(1), node1.loader(0), node1.loader(1)]
    try:
        plans: list[list[dict[str, int]]] = []
        for epoch in range(4):
            plans.append([ld.epoch_plan() for ld in loaders])
            iters = [iter(ld) for ld in loaders]
            served: list[int] = []
            while True:
                batches = [next(it, None) for it in iters]
                if all(b is None for b in batches):
                    break
                assert all(b is not None for b in batches), "ranks got unequal batch counts"
                per_rank = []
                for b in batches:
                    assert b is not None
                    assert b.epoch == epoch
                    ids = b.sample_ids.copy()
                    served.extend(ids.tolist())
                    per_rank.append((ids, varied(ids, epoch)))
                # What report() does after torch.distributed's all-gather, on every rank.
                for ld in loaders:
                    ld.report_gathered(per_rank)
            kept = plans[-1][0]["kept"]
            assert len(served) == kept == len(set(served)), f"epoch {epoch}"
    finally:
        for ld in loaders:
            ld.close()
    for epoch, per_lane in enumerate(plans):
        assert all(p == per_lane[0] for p in per_lane), f"epoch {epoch}: {per_lane}"
    assert any(p[0]["pruned"] > 0 for p in plans), [p[0] for p in plans]
    for snap in sorted(node0.state_dir.glob("epoch-*.f32")):
        other = node1.state_dir / snap.name
        assert snap.read_bytes() == other.read_bytes(), f"{snap.name} differs between nodes"


def test_bad_reports_are_refused_or_counted_and_late_ones_accepted(
    nodes: Any, tmp_path: Path
) -> None:
    node = nodes("bad", config(tmp_path, mode="none", epochs=3))
    with node.loader() as loader:
        assert not loader.layout.selection
        assert "weights" not in [t.name for t in loader.layout.tensors]
        assert len(loader) == SAMPLES // 8
        first = next(iter(loader))
        ids = first.sample_ids.copy()
        with pytest.raises(ringfeed.ArgumentError, match=r"outside the dataset.*96, -1"):
            loader.report(np.array([1, 96, -1]), np.ones(3))
        with pytest.raises(ringfeed.ArgumentError, match="3 sample ids but 2 losses"):
            loader.report([1, 2, 3], [1.0, 2.0])
        with pytest.raises(TypeError, match="sample ids must be integers, got dtype float64"):
            loader.report(np.array([1.0, 2.0]), np.ones(2))
        loader.report(ids[:4], np.array([np.nan, np.inf, -1.0, 0.5]))
        for _ in loader:
            pass
        for _ in loader:  # epoch 1
            pass
        loader.report(ids[4:], np.full(4, 0.25))  # late: served in epoch 0
        deadline = time.monotonic() + 20
        while True:
            ev = loader.evaluation()
            if ev["reports"]["losses"] + ev["reports"]["ignored_bad_loss"] >= 8:
                break
            assert time.monotonic() < deadline, ev
            time.sleep(0.05)
    assert ev["reports"]["ignored_bad_loss"] == 3
    assert ev["reports"]["losses"] == 5
    assert ev["scores"]["seen"] == 5


def test_stat_shows_loss_by_augmentation_bucket_and_class(
    nodes: Any, tmp_path: Path, runtime_dir: Path
) -> None:
    node = nodes("stat", config(tmp_path, epochs=0, extra="epochs = 8"))
    with node.loader() as loader:
        run_epochs(loader, range(2), lambda ids, epoch: (ids % 5).astype(float))
        env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime_dir)}
        deadline = time.monotonic() + 20
        while True:
            out = subprocess.run(
                [str(BINARY), "stat", "stat", "--once", "--json"],
                check=True,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            report = json.loads(out.stdout)
            fb = report["feedback"]
            if fb and fb["reports"]["losses"] >= SAMPLES + 72 and len(fb["epochs"]) == 2:
                break
            assert time.monotonic() < deadline, out.stdout
            time.sleep(0.2)
        text = subprocess.run(
            [str(BINARY), "stat", "stat", "--once"],
            check=True,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    epoch1 = fb["epochs"][-1]
    assert epoch1["epoch"] == 1
    assert {"crop_area", "crop_aspect", "flip", "rotation"} <= set(epoch1["loss_by"])
    areas = epoch1["loss_by"]["crop_area"]["buckets"]
    assert sum(b["samples"] for b in areas) == epoch1["samples"]
    assert epoch1["loss_by_class"], "per-class means"
    assert fb["selection"]["mode"] == "infobatch"
    assert "loss by crop area: " in text
    assert "loss by flip: none: " in text
    assert "loss by class (highest first): " in text
    assert "selection: infobatch, epoch " in text


def test_torch_distributed_report_reaches_every_node(
    nodes: Any, tmp_path: Path, spawn: Any
) -> None:
    """Two ranks on two nodes (one lane each) with real ``torch.distributed`` (gloo): every
    ``report`` all-gathers, so each daemon receives both ranks' losses and both decide the
    same epochs."""
    pytest.importorskip("torch.distributed")
    cfg = config(tmp_path, batch=8, epochs=3)
    node0 = nodes("d0", cfg, "--world-size", 2, "--first-rank", 0)
    node1 = nodes("d1", cfg, "--world-size", 2, "--first-rank", 1)
    port = 20000 + os.getpid() % 20000
    ranks = [
        spawn("dist_trainer.py", r, 2, port, node.name, node.runtime_dir, 3)
        for r, node in enumerate((node0, node1))
    ]
    served: dict[int, list[int]] = {}
    for process in ranks:
        for _ in range(4):
            line = json.loads(process.stdout.readline() or "{}")
            assert line, f"a rank exited early; logs:\n{node0.log()}\n{node1.log()}"
            if "epoch" in line:
                served.setdefault(line["epoch"], []).extend(line["ids"])
        assert process.wait(timeout=60) == 0
    for epoch, ids in served.items():
        assert len(ids) == len(set(ids)), f"epoch {epoch}: a sample served twice"
    assert len(served[1]) < SAMPLES, "epoch 1 prunes"
    total = sum(len(ids) for ids in served.values())
    for node in (node0, node1):
        deadline = time.monotonic() + 20
        while (
            ringfeed.evaluation(node.name, runtime_dir=node.runtime_dir)["reports"]["losses"]
            < total
        ):
            assert time.monotonic() < deadline, "a node missed the other rank's losses"
            time.sleep(0.05)
        ev = ringfeed.evaluation(node.name, runtime_dir=node.runtime_dir)
        assert ev["reports"]["losses"] == total, "each loss exactly once per node"
    for snap in sorted(node0.state_dir.glob("epoch-*.f32")):
        assert snap.read_bytes() == (node1.state_dir / snap.name).read_bytes(), snap.name


def test_a_trainer_resumed_at_an_earlier_epoch_gets_the_epochs_it_had(
    nodes: Any, tmp_path: Path
) -> None:
    """Daemon still running, trainer back to a checkpoint two epochs old: the epochs decided
    since come from their saved snapshots, so the replay matches an uninterrupted run."""
    cfg = config(tmp_path)
    with nodes("ref2", cfg).loader() as loader:
        expected = run_epochs(loader, range(8), varied)
    with nodes("back", cfg).loader() as loader:
        run_epochs(loader, range(4), varied, stop_at=(3, 4))
        checkpoint = loader.state_dict()
        run_epochs(loader, range(3, 6), varied, stop_at=(5, 2), resumed_at=4)
        loader.load_state_dict(checkpoint)
        replay = run_epochs(loader, range(3, 8), varied, resumed_at=4)
    assert replay[3] == expected[3][4 * 8 :]
    for epoch in range(4, 8):
        assert replay[epoch] == expected[epoch], f"epoch {epoch} differs after going back"


def test_a_flood_of_reports_is_never_lost(nodes: Any, tmp_path: Path) -> None:
    """Reports far faster than the daemon reads them queue in the loader (never blocking)
    and all arrive once it is closed."""
    node = nodes("flood", config(tmp_path, mode="none", epochs=1))
    rng = np.random.default_rng(1)
    ids = rng.integers(0, SAMPLES, 256)
    losses = rng.random(256).astype(np.float32)
    calls = 4000
    with node.loader() as loader:
        next(iter(loader))
        for _ in range(calls):
            loader.report(ids, losses)
        queued = len(loader._outbox)
    deadline = time.monotonic() + 60
    while True:
        got = ringfeed.evaluation(node.name, runtime_dir=node.runtime_dir)["reports"]["losses"]
        if got >= calls * 256:
            break
        assert time.monotonic() < deadline, f"{got} of {calls * 256} arrived ({queued} queued)"
        time.sleep(0.05)
    assert got == calls * 256
