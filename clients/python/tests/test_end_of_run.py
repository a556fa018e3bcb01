"""The end of a finite run against the real daemon (ring format §7 "The end of a finite
run"), refusal codes (§3), the exact generation (§3) and a trusted uid's runtime directory
(§2), all of format 1.3. The same end-of-run scenarios run through the Rust and C clients
in tests/conformance/run.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ringfeed
from ring_writer import RingWriter
from ringfeed import protocol
from test_daemon import SKIP_REASON, StartDaemon, started_daemons

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

FINITE = ("--batch-size", 16, "--epochs", 2, "--seed", 3, "--workers", 2, "--slots-per-lane", 3)


@pytest.fixture
def serve(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    yield from started_daemons(runtime_dir, tmp_path)


@pytest.mark.parametrize("linger", ["0", "10"])
@pytest.mark.parametrize("pause", [0.0, 0.5, 2.0])
def test_the_end_of_a_finite_run_is_not_a_crash(
    serve: StartDaemon, runtime_dir: Path, pause: float, linger: str
) -> None:
    # The trainer: release, pause, iterate until an epoch yields nothing. With
    # --linger 0 the daemon exits right after the last release, while the loader pauses.
    daemon = serve(*FINITE, "--exit-when-done", "--linger", linger)
    loader = daemon.loader(0, timeout=60)
    batches = len(loader)  # per epoch (0 once the stream has ended)
    per_epoch = []
    while True:
        n = 0
        for batch in loader:
            n += 1
            if batch.last_of_epoch:
                time.sleep(pause)  # holding the last batch: released at the next step
        per_epoch.append(n)
        if n == 0:
            break
        time.sleep(pause)  # before asking for the next epoch
    assert per_epoch == [batches, batches, 0]
    loader.close()
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()
    marker = json.loads((runtime_dir / "e2e.finished").read_text())
    assert int(marker["generation_str"]) == loader.generation
    # Coming back later: told the run finished, not "cannot connect".
    with pytest.raises(ringfeed.AttachError) as err:
        ringfeed.Loader("e2e", runtime_dir=runtime_dir, wait_for_producer=0)
    assert (err.value.code, err.value.retryable) == ("finished", False)


def test_a_loader_that_loses_a_finished_producer_ends_its_iteration(
    serve: StartDaemon, runtime_dir: Path
) -> None:
    # A loader told to wait for its producer re-attaches when it is gone; when the producer
    # it was reading finished its run and exited, that is the end, not a wait for another.
    daemon = serve(*FINITE, "--exit-when-done", "--linger", "0")
    loader = daemon.loader(0, timeout=60, wait_for_producer=30)
    batches = len(loader)
    assert len(list(loader)) == batches
    assert len(list(loader)) == batches
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()
    started = time.monotonic()
    assert list(loader) == []
    assert time.monotonic() - started < 5  # at once: not the 30 s wait for a producer
    loader.close()


def test_refusals_carry_codes(serve: StartDaemon, runtime_dir: Path) -> None:
    daemon = serve(*FINITE)
    holder = daemon.loader(0, timeout=60)
    with pytest.raises(ringfeed.AttachError) as held:
        ringfeed.Loader("e2e", 0, runtime_dir=runtime_dir)
    assert (held.value.code, held.value.retryable) == ("lane_held", True), held.value
    started = time.monotonic()
    with pytest.raises(ringfeed.AttachError) as waited:
        ringfeed.Loader("e2e", 0, runtime_dir=runtime_dir, wait_for_producer=0.5)
    assert waited.value.code == "lane_held"
    assert time.monotonic() - started >= 0.5
    with pytest.raises(ringfeed.AttachError) as out_of_range:
        ringfeed.Loader("e2e", 5, runtime_dir=runtime_dir, wait_for_producer=30)
    assert (out_of_range.value.code, out_of_range.value.retryable) == ("lane_range", False)
    holder.close()
    daemon.close()
    with pytest.raises(ringfeed.AttachError) as gone:
        ringfeed.Loader("e2e", 0, runtime_dir=runtime_dir, wait_for_producer=0)
    assert (gone.value.code, gone.value.retryable) == ("not_running", True)


def test_the_generation_is_exact_beyond_two_to_the_53(
    serve: StartDaemon, runtime_dir: Path
) -> None:
    daemon = serve(*FINITE)
    daemon.loader(0, timeout=60).close()
    reply = protocol.info(runtime_dir / "e2e.sock")
    # The decimal string is exact for any JSON parser; a double keeps 53 bits.
    assert str(int(reply["generation_str"])) == reply["generation_str"]
    assert int(reply["generation_str"]) == reply["generation"]


def test_a_producer_before_1_3_is_read_without_codes(runtime_dir: Path) -> None:
    # The reference producer of these tests speaks 1.0: no generation_str, no codes. A
    # generation a double cannot hold is read exactly.
    generation = (1 << 60) + 3
    assert int(float(generation)) != generation
    writer = RingWriter("old", runtime_dir, generation=generation)
    writer.serve()
    try:
        loader = ringfeed.Loader("old", runtime_dir=runtime_dir)
        assert loader.generation == generation
        with pytest.raises(ringfeed.AttachError) as held:
            ringfeed.Loader("old", runtime_dir=runtime_dir)
        assert (held.value.code, held.value.retryable) == ("unknown", True)
        loader.close()
    finally:
        writer.stop()


def test_the_runtime_directory_of_a_trusted_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    # §2 (1.3): another user's $XDG_RUNTIME_DIR is private to them, so a consumer trusting
    # that uid looks in its /tmp fallback unless RINGFEED_RUNTIME_DIR says where.
    from ringfeed.runtime import runtime_dir

    monkeypatch.delenv("RINGFEED_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/x")
    other = os.getuid() + 1
    assert runtime_dir() == Path("/x/ringfeed")
    assert runtime_dir(trust_uid=os.getuid()) == Path("/x/ringfeed")
    assert runtime_dir(trust_uid=other) == Path(f"/tmp/ringfeed-{other}")
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", "/r")
    assert runtime_dir(trust_uid=other) == Path("/r")
    assert runtime_dir("/given", trust_uid=other) == Path("/given")
