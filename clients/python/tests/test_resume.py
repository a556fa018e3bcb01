"""Resume that refuses the wrong state, rank checks and padding marks, against the real daemon
(format 1.3; ``$RINGFEED_BIN`` or ``<repo>/target/debug/ringfeed``, skipped when missing).

What is promised (and tested here): a state saved at batch size 8 resumes on a daemon
restarted at batch size 4 at the same sample position, and one at batch size 16 at the batch
holding it (a warning says so); one saved at world size 2 resumes at world size 1 and 4 with
the same global batch where it stopped, the rest of the epoch once across the new ranks
(elastic resume); a seed or dataset change is refused naming the field with both
values; hostile states are refused before anything is sent; a trainer whose RANK / WORLD_SIZE
differs from what its lane serves is refused with how to start the daemon; the padded tail of
an epoch is marked 0 in ``valid`` and every sample is valid exactly once; a daemon that is not
running yet is waited for, and one that never comes is reported with the rings that run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ringfeed
from test_daemon import REPO, Daemon, StartDaemon, _skip_reason, started_daemons

pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))

SHARDS = [REPO / "data" / "sample" / f"shard-00000{i}.tar" for i in (0, 1)]
COMMON = ("--epochs", 2, "--seed", 3, "--workers", 2, "--slots-per-lane", 3)


@pytest.fixture
def serve(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    yield from started_daemons(runtime_dir, tmp_path)


@pytest.fixture(autouse=True)
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def epoch_ids(loader: ringfeed.Loader) -> list[list[int]]:
    """The sample ids of every batch of the loader's current epoch."""
    return [batch.sample_ids.tolist() for batch in loader]


def stop(daemon: Daemon) -> None:
    daemon.close()


def test_a_batch_size_change_resumes_at_the_same_sample(serve: StartDaemon) -> None:
    first = serve("--batch-size", 8, *COMMON)
    with first.loader() as loader:
        fingerprint = loader.state_dict()["fingerprint"]
        assert (fingerprint["batch_size"], fingerprint["world_size"]) == (8, 1)
        seen = [next(loader).sample_ids.tolist() for _ in range(3)]
        state = loader.state_dict()
    stop(first)
    assert (state["epoch"], state["index"], state["sample"]) == (0, 3, 24)

    # The uninterrupted order at batch size 4, for reference.
    reference = serve("--batch-size", 4, *COMMON)
    with reference.loader() as loader:
        order = [i for batch in epoch_ids(loader) for i in batch]
    stop(reference)
    assert order[:24] == [i for batch in seen for i in batch]

    smaller = serve("--batch-size", 4, *COMMON)
    with pytest.warns(ringfeed.RingfeedWarning, match=r"batch_size 8 → 4.*sample 24.*batch 6"):
        loader = smaller.loader(resume=state)
    with loader:
        rest = epoch_ids(loader)
        assert loader.state_dict()["epoch"] == 1
    stop(smaller)
    assert rest[0] == order[24:28]
    resumed = [i for batch in seen for i in batch] + [i for batch in rest for i in batch]
    assert resumed == order  # every sample of the epoch once, in the uninterrupted order

    # Batch size 16: sample 24 lies inside batch 1 (16..31), which is served whole.
    larger = serve("--batch-size", 16, *COMMON)
    with pytest.warns(ringfeed.RingfeedWarning, match="mid-batch.*starts at sample 16"):
        loader = larger.loader(resume=state)
    with loader:
        batch = next(loader)
        assert batch.index == 1
        assert batch.sample_ids.tolist() == order[16:32]


def test_a_seed_or_dataset_change_is_refused_naming_the_field(serve: StartDaemon) -> None:
    first = serve("--batch-size", 8, "--shards", *map(str, SHARDS), *COMMON)
    with first.loader() as loader:
        next(loader)
        state = loader.state_dict()
    stop(first)

    reseeded = serve("--batch-size", 8, "--shards", *map(str, SHARDS), "--epochs", 2, "--seed", 4)
    reseeded.loader().close()  # wait until it serves
    with pytest.raises(ringfeed.ResumeMismatch, match=r"seed 3 \(saved\) vs 4") as refused:
        ringfeed.Loader("e2e", runtime_dir=reseeded.runtime_dir, resume=state)
    assert [f[0] for f in refused.value.fields] == ["seed"]
    assert refused.value.fields[0][1:] == ("3", "4")
    stop(reseeded)

    fewer = serve("--batch-size", 8, "--shards", str(SHARDS[0]), *COMMON)
    fewer.loader().close()
    with pytest.raises(ringfeed.ResumeMismatch, match="dataset") as refused:
        ringfeed.Loader("e2e", runtime_dir=fewer.runtime_dir, resume=state)
    assert [f[0] for f in refused.value.fields] == ["dataset", "samples"]
    assert refused.value.fields[1][1:] == ("96", "48")
    # The refusal left the lane free: a fresh start works.
    with fewer.loader() as loader:
        assert next(loader).index == 0


def test_hostile_states_are_refused_before_anything_is_sent(serve: StartDaemon) -> None:
    daemon = serve("--batch-size", 8, *COMMON)
    with daemon.loader() as loader:
        good = loader.state_dict()
    bad_states: list[Any] = [
        "epoch=1",
        {"epoch": "1", "index": 0, "fingerprint": {}},
        {"epoch": -1, "index": 0, "fingerprint": {}},
        {"epoch": 0, "index": 2**64, "fingerprint": {}},
        {"epoch": True, "index": 0, "fingerprint": {}},
        {"epoch": 0},
        {**good, "fingerprint": ["seed", 3]},
        {**good, "sample": -5},
        {**good, "sample": 1.5},
        {**good, "fingerprint": {"seed": {1, 2}}},
        {**good, "fingerprint": {"seed": float("nan")}},
    ]
    for bad in bad_states:
        with pytest.raises(ringfeed.RingfeedError) as err:
            ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir, resume=bad)
        assert not isinstance(err.value, ringfeed.AttachError), bad
    # Forged fingerprints reach the daemon, which names what differs; junk fields are ignored.
    forged = {**good, "fingerprint": {**good["fingerprint"], "seed": 99, "world_size": "two"}}
    with pytest.raises(ringfeed.ResumeMismatch, match="seed 99") as refused:
        ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir, resume=forged)
    # A world size that differs is remapped, not refused (elastic resume): only the seed is.
    assert [f[0] for f in refused.value.fields] == ["seed"]
    with pytest.raises(ringfeed.ResumeMismatch):
        ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir, resume={**good, "fingerprint": {}})
    huge = {**good, "fingerprint": {**good["fingerprint"], "junk": "x" * 5000}}
    with pytest.raises(ringfeed.AttachError, match="longer than 4096"):
        ringfeed.Loader("e2e", runtime_dir=daemon.runtime_dir, resume=huge, wait_for_producer=0)
    # The daemon still serves after all that.
    with daemon.loader(resume=good) as loader:
        assert next(loader).index == 0


def test_a_world_size_change_with_the_same_global_batch_resumes_where_it_stopped(
    serve: StartDaemon,
) -> None:
    # World 2 × batch 4 (global 8): each rank takes 3 batches, then the job stops.
    first = serve("--lanes", 2, "--world-size", 2, "--batch-size", 4, *COMMON)
    seen: list[int] = []
    states = []
    for lane in (0, 1):
        with first.loader(lane, rank=lane, world_size=2) as loader:
            seen += [i for _ in range(3) for i in next(loader).sample_ids.tolist()]
            states.append(loader.state_dict())
    stop(first)
    assert [s["sample"] for s in states] == [24, 24]
    # World 1 × batch 8 (global 8) from rank 0's state; then world 4 × batch 2 from each.
    one = serve("--batch-size", 8, *COMMON)
    with pytest.warns(ringfeed.RingfeedWarning, match=r"world_size 2 → 1, batch_size 4 → 8"):
        loader = one.loader(resume=states[0], rank=0, world_size=1)
    with loader:
        rest = [i for batch in epoch_ids(loader) for i in batch]
    stop(one)
    assert sorted(seen + rest) == sorted(set(seen + rest)), "a sample served twice"
    assert len(seen + rest) == 96, "the epoch, every sample once"
    four = serve("--lanes", 4, "--world-size", 4, "--batch-size", 2, *COMMON)
    loaders = []
    for rank in range(4):
        with pytest.warns(ringfeed.RingfeedWarning, match="world_size 2 → 4"):
            loaders.append(four.loader(rank, resume=states[rank % 2], rank=rank, world_size=4))
    per_rank: list[list[list[int]]] = [[] for _ in loaders]

    def drain(rank: int) -> None:  # the ranks consume at once, as trainers do
        with loaders[rank] as loader:
            per_rank[rank] = epoch_ids(loader)

    threads = [threading.Thread(target=drain, args=(rank,)) for rank in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    stop(four)
    assert [len(batches) for batches in per_rank] == [9] * 4, "equal batches per rank"
    rest4 = [i for batches in per_rank for batch in batches for i in batch]
    assert sorted(rest4) == sorted(rest), "the same rest of the epoch, each sample once"


def test_a_rank_or_world_mismatch_is_refused(
    serve: StartDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = serve("--lanes", 2, "--world-size", 4, "--first-rank", 2, "--batch-size", 4, *COMMON)
    with daemon.loader(1, rank=3, world_size=4) as loader:
        assert loader.ring.lane_rank(1) == 3
        assert loader.layout.world_size == 4
    with pytest.raises(ringfeed.RankMismatch, match=r"world size 2 here, 4 in the daemon") as err:
        ringfeed.Loader("e2e", 0, rank=2, world_size=2, runtime_dir=daemon.runtime_dir)
    assert "--world-size 2" in str(err.value)
    assert "ringfeed.serve()" in str(err.value)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ringfeed.RankMismatch, match="rank 1 here, lane 1 serves rank 3") as err:
        ringfeed.Loader("e2e", 1, runtime_dir=daemon.runtime_dir)
    assert "--first-rank 0" in str(err.value)
    monkeypatch.setenv("RANK", "2")
    with daemon.loader(0) as loader:  # the environment's rank is the lane's
        assert next(loader).valid_count == 4
    info = ringfeed.info(daemon.runtime_dir / "e2e.sock")
    assert (info["world_size"], info["first_rank"]) == (4, 2)


def test_serve_says_loudly_what_world_size_it_assumed(serve: StartDaemon) -> None:
    daemon = serve("--lanes", 2, "--batch-size", 4, *COMMON)
    with daemon.loader() as loader:
        assert loader.layout.world_size == 2
    assert "WORLD SIZE ASSUMED" in daemon.stderr()
    assert "ranks 0-1 of world size 2" in daemon.stderr()


def test_the_padded_tail_is_marked_by_valid(serve: StartDaemon, tmp_path: Path) -> None:
    # 96 samples, 2 ranks × 10 per batch: 5 global batches, the last with 16 of 20 new.
    config = tmp_path / "pad.toml"
    config.write_text(
        f'[source]\nkind = "tar"\nshards = {[str(s) for s in SHARDS]!r}\n'.replace("'", '"')
        + "[sampling]\ndrop-last = false\n"
        + "[augment]\nrandom-resized-crop = { size = 32 }\n"
    )
    daemon = serve("--config", config, "--lanes", 2, "--world-size", 2, "--batch-size", 10, *COMMON)
    valid_ids: list[int] = []
    padding = 0
    for lane in (0, 1):
        with daemon.loader(lane, rank=lane, world_size=2) as loader:
            for batch in loader:
                mask = batch.valid.astype(bool)
                assert batch.valid.dtype == np.uint8
                assert batch.valid_count == int(mask.sum())
                valid_ids += batch.sample_ids[mask].tolist()
                padding += batch.count - batch.valid_count
                if not batch.last_of_epoch:
                    assert batch.valid_count == batch.count
            assert loader.ring.lane_stats(lane)["rank_samples"] == (50 if lane == 0 else 46)
    assert sorted(valid_ids) == list(range(96))
    assert padding == 4


def test_the_default_wait_covers_a_daemon_started_at_the_same_moment(
    serve: StartDaemon, runtime_dir: Path
) -> None:
    holder: list[Daemon] = []
    timer = threading.Timer(0.5, lambda: holder.append(serve("--batch-size", 8, *COMMON)))
    timer.start()
    try:
        with ringfeed.Loader("e2e", runtime_dir=runtime_dir, timeout=60) as loader:
            assert next(loader).index == 0
    finally:
        timer.join()


def test_a_daemon_that_never_comes_is_reported_with_the_running_rings(
    serve: StartDaemon, runtime_dir: Path
) -> None:
    daemon = serve("--batch-size", 8, *COMMON)
    daemon.loader().close()
    with pytest.raises(ringfeed.DaemonNotRunning) as err:
        ringfeed.Loader("typo", runtime_dir=runtime_dir, wait_for_producer=0.3)
    message = str(err.value)
    assert "rings running there: 'e2e'" in message
    assert "ringfeed serve --name typo" in message
