"""Augmentation policies and batch mixing end to end: the real ``ringfeed serve`` with
RandAugment, random erasing and mixup/CutMix (``[augment]``), read through the Python client.

Skipped, with the reason, when the binary is missing (see ``test_daemon.py``).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import ringfeed
from test_daemon import BINARY, REPO, SKIP_REASON

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

SAMPLES = 96
CLASSES = len((REPO / "data" / "sample" / "classes.txt").read_text().split())


def config(tmp_path: Path, mixing: str) -> Path:
    shards = REPO / "data" / "sample" / "shard-{000000..000001}.tar"
    path = tmp_path / "policies.toml"
    path.write_text(
        f"""
[source]
kind = "tar"
shards = ["{shards}"]
num-classes = {CLASSES}
[sampling]
seed = 5
drop-last = true
epochs = 2
[batch]
size = 8
[augment]
random-resized-crop = {{ size = 32 }}
horizontal-flip = {{ p = 0.5 }}
rand-augment = {{ n = 2, m = 9, m-std = 0.5, bins = 11 }}
normalize = {{ mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}
random-erasing = {{ p = 0.25, value = "random" }}
{mixing}
[ring]
lanes = 1
slots-per-lane = 3
[workers]
threads = 2
"""
    )
    return path


#: The ``serve`` fixture: starts a daemon with a ``[batch]`` mixing section and attaches.
StartLoader = Callable[[str], ringfeed.Loader]


@pytest.fixture
def serve(tmp_path: Path, runtime_dir: Path) -> Iterator[StartLoader]:
    started: list[subprocess.Popen[bytes]] = []

    def start(mixing: str) -> ringfeed.Loader:
        with (tmp_path / "serve.log").open("ab") as log:
            process = subprocess.Popen(
                [str(BINARY), "serve", "-c", str(config(tmp_path, mixing)), "--name", "pol"],
                cwd=REPO,
                env={**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime_dir)},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        started.append(process)
        deadline = time.monotonic() + 60
        while True:
            try:
                return ringfeed.Loader("pol", 0, runtime_dir=runtime_dir, timeout=60)
            except ringfeed.AttachError:
                if process.poll() is not None or time.monotonic() > deadline:
                    text = (tmp_path / "serve.log").read_text(errors="replace")
                    raise AssertionError(f"daemon not serving:\n{text[-3000:]}") from None
                time.sleep(0.05)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_mixup_cutmix_targets_mix_two_classes(serve: StartLoader) -> None:
    """mix-prob 1, no smoothing: every row's target is its own label and its mirror row's,
    weighted λ and 1 − λ, summing to 1; most rows (different labels, λ < 1) mix two classes."""
    mixing = (
        "mixup = { alpha = 0.8 }\ncutmix = { alpha = 1.0 }\nmix-prob = 1.0\n"
        "switch-prob = 0.5\nlabel-smoothing = 0.0"
    )
    rows = two_class_rows = 0
    with serve(mixing) as loader:
        names = [t.name for t in loader.layout.tensors]
        assert names == ["images", "labels", "sample_ids", "valid", "targets"]
        for batch in loader:
            targets = batch.targets.copy()
            labels = batch.labels.copy()
            assert targets.shape == (8, CLASSES)
            assert targets.dtype == np.float32
            np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
            assert (targets >= 0).all()
            images = batch.images
            assert np.isfinite(images).all()
            for i, row in enumerate(targets):
                partner = labels[len(labels) - 1 - i]
                present = set(np.flatnonzero(row > 1e-6).tolist())
                assert present <= {int(labels[i]), int(partner)}, (i, present, labels)
                rows += 1
                two_class_rows += len(present) == 2
            if batch.epoch == 1:
                break
    assert rows >= 8 * 12
    assert two_class_rows > rows * 0.6, f"{two_class_rows} of {rows} rows mix two classes"


def test_repeated_augmentation_serves_count_distinct_views(serve: StartLoader) -> None:
    """repeated-augment count 3: len(loader) triples, every sample comes 3 times per epoch, and
    its 3 images are 3 different augmentations."""
    with serve("repeated-augment = { count = 3 }") as loader:
        assert len(loader) == SAMPLES * 3 // 8
        for epoch in range(2):
            views: dict[int, list[bytes]] = {}
            count = 0
            for batch in loader:
                assert batch.epoch == epoch
                for sid, image in zip(batch.sample_ids.tolist(), batch.images):
                    views.setdefault(sid, []).append(image.tobytes())
                count += 1
            assert count == len(loader)
            assert sorted(views) == list(range(SAMPLES))
            for sid, images in views.items():
                assert len(images) == 3, f"sample {sid}: {len(images)} views"
                assert len(set(images)) == 3, f"sample {sid}: views repeat"


def test_label_smoothing_without_mixing_is_refused(tmp_path: Path, runtime_dir: Path) -> None:
    """label-smoothing alone is a configuration error naming the key, not a silent no-op."""
    cfg = config(tmp_path, "label-smoothing = 0.1")
    result = subprocess.run(
        [str(BINARY), "serve", "-c", str(cfg), "--name", "refused"],
        cwd=REPO,
        env={**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime_dir)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "label-smoothing" in result.stderr, result.stderr
