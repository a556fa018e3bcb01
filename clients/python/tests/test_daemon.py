"""End-to-end tests against the real ``ringfeed serve`` binary on the bundled sample dataset.

The binary is ``$RINGFEED_BIN`` or ``<repo>/target/debug/ringfeed``; every test here is
skipped, with the reason, when it is missing or ``ringfeed serve --help`` fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pytest

import ringfeed
from conftest import Spawn
from helpers import read_report

REPO = Path(__file__).resolve().parents[3]
BINARY = Path(os.environ.get("RINGFEED_BIN", REPO / "target" / "debug" / "ringfeed")).absolute()


def _skip_reason() -> str | None:
    if not BINARY.is_file():
        return f"ringfeed binary not found at {BINARY} (build it or set RINGFEED_BIN)"
    try:
        probe = subprocess.run(
            [str(BINARY), "serve", "--help"], capture_output=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`{BINARY} serve --help` failed: {err}"
    if probe.returncode != 0:
        return f"`{BINARY} serve --help` exited {probe.returncode}: {probe.stderr[-300:]!r}"
    return None


SKIP_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


class DaemonProcess:
    """A running ``ringfeed serve`` (``argv`` says which rings) with its stderr kept for
    failure messages. :class:`Daemon` serves one named ring; ``test_passes.MultiDaemon``
    several, from configuration files."""

    def __init__(self, runtime_dir: Path, log: Path, argv: list[str]) -> None:
        self.runtime_dir, self.log_path = runtime_dir, log
        self.log = log.open("wb")
        env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime_dir)}
        try:
            self.process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=self.log
            )
        except BaseException:
            self.log.close()
            raise

    def attach(self, ring: str, lane: int, **options: Any) -> ringfeed.Loader:
        """Attach to lane ``lane`` of ``ring`` once the daemon serves it; fail at once, with
        its stderr, if it exits first. ``options`` are :class:`ringfeed.Loader`'s."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return ringfeed.Loader(ring, lane, runtime_dir=self.runtime_dir, **options)
            except ringfeed.AttachError as err:
                exited = self.process.poll()
                if exited is not None or time.monotonic() > deadline:
                    status = "still running" if exited is None else f"exited with {exited}"
                    raise AssertionError(
                        f"{err}\ndaemon {status}; stderr:\n{self.stderr()}"
                    ) from err
                time.sleep(0.05)

    def stderr(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


class Daemon(DaemonProcess):
    """``ringfeed serve --name NAME ARGS…``, optionally behind a ``prefix`` command
    (``unshare``, ``setpriv``)."""

    def __init__(
        self, name: str, runtime_dir: Path, log: Path, *args: object, prefix: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        argv = [*prefix, str(BINARY), "serve", "--name", name, *map(str, args)]
        super().__init__(runtime_dir, log, argv)

    def loader(self, lane: int = 0, *, ring: str | None = None, **options: Any) -> ringfeed.Loader:
        """Attach to ``lane`` of ``ring`` (default: this daemon's name)."""
        return self.attach(self.name if ring is None else ring, lane, **options)


class StartDaemon(Protocol):
    """The ``serve`` fixture: starts ``ringfeed serve --name e2e ARGS…`` in the test's runtime
    directory, killed at teardown."""

    def __call__(self, *args: object, prefix: tuple[str, ...] = ()) -> Daemon: ...


@pytest.fixture
def serve(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    yield from started_daemons(runtime_dir, tmp_path)


def started_daemons(runtime_dir: Path, tmp_path: Path) -> Iterator[StartDaemon]:
    """The ``serve`` fixture's body (other modules' fixtures reuse it): starts daemons that
    run as ring "e2e" in ``runtime_dir`` and are killed at teardown."""
    daemons: list[Daemon] = []

    def start(*args: object, prefix: tuple[str, ...] = ()) -> Daemon:
        log = tmp_path / f"daemon{len(daemons)}.log"
        daemon = Daemon("e2e", runtime_dir, log, *args, prefix=prefix)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        daemon.close()


BASE = ("--batch-size", 8, "--epochs", 2, "--seed", 3, "--workers", 2, "--slots-per-lane", 3)


def check_batch(batch: ringfeed.Batch, layout: ringfeed.RingLayout) -> None:
    for spec in layout.tensors:
        array = batch.tensors[spec.name]
        assert array.shape == spec.shape, spec.name
        assert array.dtype == spec.dtype, spec.name
    images = batch.images
    if images.dtype.kind == "f":
        assert np.isfinite(images).all()
        assert float(images.min()) >= -3.0
        assert float(images.max()) <= 3.0
    ids = batch.sample_ids
    assert (ids >= 0).all()
    if layout.samples_per_epoch:
        assert (ids < layout.samples_per_epoch).all()


def test_two_epochs_every_sample_once_and_consistent_labels(serve: StartDaemon) -> None:
    daemon = serve("--lanes", 1, *BASE)
    label_of: dict[int, int] = {}
    with daemon.loader() as loader:
        layout = loader.layout
        assert layout.batch_size == 8
        assert [t.name for t in layout.tensors][:3] == ["images", "labels", "sample_ids"]
        for epoch in range(2):
            ids: list[int] = []
            indices = []
            for batch in loader:
                assert batch.epoch == epoch
                indices.append(batch.index)
                check_batch(batch, layout)
                ids.extend(batch.sample_ids.tolist())
                for sample, label in zip(batch.sample_ids.tolist(), batch.labels.tolist()):
                    assert label_of.setdefault(sample, label) == label, f"sample {sample}"
            assert indices == list(range(len(indices)))
            if layout.batches_per_epoch:
                assert len(indices) == len(loader)
            assert len(ids) == len(set(ids)), f"epoch {epoch} repeats a sample"
            n = layout.samples_per_epoch
            if n and layout.drop_last and n % layout.batch_size == 0:
                assert sorted(ids) == list(range(n))
        assert [b.index for b in loader] == []  # --epochs 2: the stream ends


def test_two_lanes_in_two_processes_get_disjoint_samples(
    serve: StartDaemon, spawn: Spawn, runtime_dir: Path
) -> None:
    daemon = serve("--lanes", 2, *BASE)
    daemon.loader().close()  # wait until it serves
    consumers = [spawn("consumer_proc.py", "consume", "e2e", runtime_dir, lane) for lane in (0, 1)]
    per_lane: list[set[int]] = []
    for consumer in consumers:
        ids: set[int] = set()
        report = read_report(consumer)
        while "done" not in report:
            if report["epoch"] == 0:
                for _, _, batch_ids in report["batches"]:
                    ids.update(batch_ids)
            report = read_report(consumer)
        assert consumer.wait(timeout=60) == 0
        per_lane.append(ids)
    assert per_lane[0]
    assert per_lane[1]
    assert not per_lane[0] & per_lane[1]


def test_killed_daemon_raises_producer_gone_within_a_second(serve: StartDaemon) -> None:
    daemon = serve("--lanes", 1, "--batch-size", 8, "--epochs", 1000, "--slots-per-lane", 2)
    daemon.loader().close()  # wait until it serves
    with daemon.loader(wait_for_producer=0) as loader:
        outcome: list[tuple[BaseException, float]] = []
        started = threading.Event()

        def consume() -> None:
            try:
                while True:
                    for _ in loader:
                        started.set()
            except BaseException as err:
                outcome.append((err, time.monotonic()))

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        assert started.wait(timeout=60), daemon.stderr()
        killed_at = time.monotonic()
        daemon.process.send_signal(signal.SIGKILL)
        thread.join(timeout=10)
        error, raised_at = outcome[0]
        assert isinstance(error, ringfeed.ProducerGone), error
        assert (error.reason, error.pid) == ("died", daemon.process.pid)
        # At most slots_per_lane ready batches remain to drain, then the loss must show.
        assert raised_at - killed_at < 1.0


def test_the_package_version_is_the_crates() -> None:
    # One source: Cargo.toml's [package] version is the binary's (`ringfeed --version`) and,
    # through maturin's dynamic version, the installed package's (tests/packaging.sh installs
    # the wheel it built before these tests run).
    if ringfeed.__version__ == "0+unknown":
        pytest.skip("ringfeed is imported from a source tree that was never installed")
    with (REPO / "Cargo.toml").open() as manifest:
        crate = next(line for line in manifest if line.startswith("version = "))
    assert ringfeed.__version__ == crate.split('"')[1]
    shown = subprocess.run(
        [str(BINARY), "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    assert shown == f"ringfeed {ringfeed.__version__}"


def test_sigterm_stops_the_daemon_cleanly(serve: StartDaemon, runtime_dir: Path) -> None:
    daemon = serve("--lanes", 1, *BASE)
    daemon.loader().close()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()
    assert not (runtime_dir / "e2e.sock").exists()
    assert not (runtime_dir / "e2e.lock").exists()
    assert daemon.stderr().strip(), "the daemon prints a status line to stderr"


def test_shm_dir_ring_file_is_read_and_removed(
    serve: StartDaemon, runtime_dir: Path, tmp_path: Path
) -> None:
    shm = tmp_path / "shm"
    shm.mkdir(mode=0o700)
    daemon = serve("--lanes", 1, "--shm-dir", shm, *BASE)
    loader = daemon.loader()
    ring_file = shm / "ringfeed-e2e.ring"
    assert ring_file.stat().st_mode & 0o777 == 0o600
    batch = next(iter(loader))
    assert batch["images"].shape[0] == 8
    loader.close()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(timeout=30) == 0, daemon.stderr()
    assert not ring_file.exists()


def test_u8_ring_normalised_by_the_client_equals_the_f32_ring(
    serve: StartDaemon, runtime_dir: Path, tmp_path: Path
) -> None:
    """`output.dtype = "u8"` with `normalize`: raw pixels on the wire, mean/std in the header;
    ``batch.to(device, normalize=True)`` (CPU here: the same torch code as on a GPU) gives the
    daemon's own f32 values, bit for bit, for the same seed."""
    torch = pytest.importorskip("torch")
    f32_config = (REPO / "configs" / "default.toml").read_text()
    u8_config = f32_config.replace('dtype = "f32"', 'dtype = "u8"')
    assert u8_config != f32_config
    rings = {}
    for dtype, text in (("f32", f32_config), ("u8", u8_config)):
        path = tmp_path / f"{dtype}.toml"
        path.write_text(text.replace('"data/sample/', f'"{REPO}/data/sample/'))
        daemon = Daemon(
            f"norm-{dtype}", runtime_dir, tmp_path / f"{dtype}.log",
            "--config", path, "--epochs", 1, "--batch-size", 8, "--workers", 2,
        )  # fmt: skip
        rings[dtype] = daemon
    try:
        with rings["f32"].loader() as f32_loader, rings["u8"].loader() as u8_loader:
            layout = u8_loader.layout
            assert layout.tensors[0].dtype_name == "u8"
            assert layout.std[:3] == pytest.approx((0.229, 0.224, 0.225))
            compared = 0
            for want, got in zip(f32_loader, u8_loader):
                np.testing.assert_array_equal(want.sample_ids, got.sample_ids)
                raw = got.images.copy()
                x, y = got.to("cpu", normalize=True)
                assert x.dtype == torch.float32
                np.testing.assert_array_equal(x.numpy(), want.images)
                np.testing.assert_array_equal(y.numpy(), want.labels)
                np.testing.assert_array_equal(got.images, raw)  # the ring is not touched
                compared += 1
            assert compared == len(f32_loader)
    finally:
        for daemon in rings.values():
            daemon.close()


def test_a_mixture_of_two_datasets_serves_a_u16_source_tensor_by_weight(
    serve: StartDaemon, tmp_path: Path
) -> None:
    """Two streams (the bundled sample's two shards, 48 photos each) mixed 3 : 1 into epochs of
    64: the ``source`` tensor (u16) says where each sample came from, 48 + 16 per epoch."""
    shard = REPO / "data" / "sample" / "shard-{:06d}.tar"
    config = tmp_path / "mix.toml"
    config.write_text(
        f'[[source.streams]]\nname = "first"\nkind = "tar"\nshards = ["{str(shard).format(0)}"]\n'
        "weight = 3\n"
        f'[[source.streams]]\nname = "second"\nkind = "tar"\nshards = ["{str(shard).format(1)}"]\n'
        "label-offset = 8\n"
        "[sampling]\nsamples-per-epoch = 64\ndrop-last = true\n"
        "[augment]\nrandom-resized-crop = { size = 32 }\n"
    )
    daemon = serve("--config", config, "--batch-size", 8, "--epochs", 2, "--workers", 2)
    with daemon.loader() as loader:
        assert [t.name for t in loader.layout.tensors] == [
            "images", "labels", "sample_ids", "source", "valid",
        ]  # fmt: skip
        assert len(loader) == 8
        for _ in range(2):
            sources, ids, labels = [], [], []
            for batch in loader:
                assert batch["source"].dtype == np.uint16
                sources.extend(batch["source"].tolist())
                ids.extend(batch.sample_ids.tolist())
                labels.extend(batch.labels.tolist())
            assert (sources.count(0), sources.count(1)) == (48, 16)
            assert len(set(ids)) == 64
            for source, sample, label in zip(sources, ids, labels):
                assert (sample < 48) == (source == 0)
                assert (label >= 8) == (source == 1)  # label-offset of the second stream
