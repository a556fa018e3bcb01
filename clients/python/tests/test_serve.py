"""ringfeed.serve(): the daemon started from the training script, against the real binary
(``$RINGFEED_BIN`` or ``<repo>/target/debug/ringfeed``; skipped with the reason when missing).

What is promised (and tested here): serve() returns once the ring serves; leaving ``with``
stops the daemon; a daemon whose starter was SIGKILLed is gone within 10 s; a starter thread
that ends does not stop it (the daemon watches the process, not the thread that forked it);
under torchrun only local rank 0 starts it and each rank reads its own lane.
"""

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
from test_daemon import BINARY, _skip_reason

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def env(runtime_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("RINGFEED_BIN", str(BINARY))
    monkeypatch.setenv("RINGFEED_RUNTIME_DIR", str(runtime_dir))
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}


def test_serve_serves_an_epoch_and_leaving_with_stops_it(env: dict[str, str]) -> None:
    with ringfeed.serve(name="sv-epoch", epochs=1, batch_size=16) as daemon:
        assert daemon.owned
        assert daemon.name == "sv-epoch"
        with daemon.loader() as loader:
            batches = sum(1 for _ in loader)
            assert batches == len(loader) > 0
    assert wait_gone(daemon.pid, 10)


def test_a_bad_flag_fails_serve_with_the_daemons_own_words(env: dict[str, str]) -> None:
    with pytest.raises(ringfeed.RingfeedError, match="exited with status 2 before serving") as err:
        ringfeed.serve(name="sv-bad", no_such_flag=3)
    assert "--no-such-flag" in str(err.value)


def test_sigkilled_starter_leaves_no_daemon(env: dict[str, str]) -> None:
    starter = subprocess.Popen(
        [sys.executable, str(HERE / "serve_proc.py"), "hold", "sv-kill"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert starter.stdout is not None
        pid = json.loads(starter.stdout.readline())["daemon_pid"]
        assert not gone(pid)
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        assert wait_gone(pid, 10), f"daemon {pid} outlived its SIGKILLed starter by 10 s"
    finally:
        if starter.poll() is None:
            starter.kill()
        starter.wait()
        if starter.stdout is not None:
            starter.stdout.close()


def test_the_starting_thread_ending_does_not_stop_the_daemon(env: dict[str, str]) -> None:
    started: list[ringfeed.Daemon] = []
    thread = threading.Thread(target=lambda: started.append(ringfeed.serve(name="sv-thread")))
    thread.start()
    thread.join()
    (daemon,) = started
    try:
        with daemon.loader() as loader:
            assert sum(1 for _ in zip(range(3), loader)) == 3
        assert not gone(daemon.pid)
    finally:
        daemon.stop()
    assert wait_gone(daemon.pid, 10)


def test_two_torchrun_ranks_read_their_own_lanes_of_one_daemon(
    env: dict[str, str], tmp_path: Path
) -> None:
    torchrun = {
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "TORCHELASTIC_RUN_ID": f"test-{os.getpid()}",
        "GROUP_RANK": "0",
    }
    ranks = [
        subprocess.Popen(
            [sys.executable, str(HERE / "serve_proc.py"), "rank", "-", str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            env={**env, **torchrun, "LOCAL_RANK": str(rank), "RANK": str(rank)},
        )
        for rank in (1, 0)  # rank 1 first: it must wait for rank 0's daemon
    ]
    reports = []
    try:
        for process in ranks:
            out, _ = process.communicate(timeout=300)
            assert process.returncode == 0, out
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    by_rank = {r["rank"]: r for r in reports}
    assert by_rank[0]["owned"]
    assert not by_rank[1]["owned"]
    assert by_rank[0]["pid"] == by_rank[1]["pid"]
    assert by_rank[0]["name"] == by_rank[1]["name"]
    assert by_rank[0]["lanes"] == [0]
    assert by_rank[1]["lanes"] == [1]
    assert by_rank[0]["ids"]
    assert by_rank[1]["ids"]
    assert not set(by_rank[0]["ids"]) & set(by_rank[1]["ids"]), "the ranks' samples overlap"
    assert wait_gone(by_rank[0]["pid"], 10)


def test_a_config_error_is_reported_once(
    env: dict[str, str], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[source]\nshards = ["x.tar"]\n[augment]\n'
        "random-resized-crop = { size = 32 }\nresize = { size = 40 }\n"
    )
    with pytest.raises(ringfeed.RingfeedError, match="cannot be combined with resize") as err:
        ringfeed.serve(config=config, name="sv-once")
    assert str(err.value).count("cannot be combined") == 1
    assert "augment: random" not in str(err.value)  # "[augment]: augment:" said it twice
    assert "cannot be combined" not in capfd.readouterr().err  # not echoed as well
