"""The loaders under comparison, each run once on the same JPEGs through the same pipeline.

Pipeline everywhere: decode → RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)) →
horizontal flip p=0.5 → float32 CHW normalised with the ImageNet mean/std → batches of 256
(full batches only). Every runner builds its loader from scratch, runs a :class:`Workload`
through :func:`measure.consume` and tears the loader down again, so runs can be interleaved.
PyTorch and DALI are imported lazily: the ringfeed runner needs only numpy and the client.
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from measure import Timing, Workload, consume

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROP = 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5

# The policy pipeline (compare.py --policy): RandAugment as policy.toml configures it.
RA_OPS, RA_MAGNITUDE, RA_BINS = 2, 9, 11
ERASE_P = 0.25
DALI_FILL = 124  # DALI's rand_augment takes one fill value for all channels (ringfeed: 124 116 104)
MIXUP_ALPHA, CUTMIX_ALPHA, SMOOTHING = 0.8, 1.0, 0.1
RINGFEED_PLAIN = "ringfeed, plain pipeline"

FULL_DECODE = "full decode, one core"
FULL_DECODE_CPU = "full decode, per CPU second"

_ring_names = itertools.count()


class UnavailableError(Exception):
    """A peer that cannot run on this machine; the message says why."""


@dataclass(frozen=True)
class Dataset:
    """One set of JPEGs in both layouts the loaders read, plus how it is batched."""

    shards: tuple[Path, ...]
    imagefolder: Path | None
    images: int
    batch_size: int

    @property
    def batches_per_epoch(self) -> int:
        """Full batches in one epoch (drop-last semantics for every loader)."""
        return self.images // self.batch_size


@dataclass(frozen=True)
class Ringfeed:
    """Where the daemon and its configuration are."""

    binary: Path
    config: Path
    root: Path


# --- ringfeed: the daemon plus the Python client, as a trainer uses them -------------------


def run_ringfeed(
    rf: Ringfeed, data: Dataset, work: Workload, workers: int, policy: bool = False
) -> Timing:
    """Starts ``ringfeed serve`` for exactly the epochs of ``work`` and consumes them; with
    ``policy`` each batch's ``targets`` (the daemon's mixing) is touched too."""
    import ringfeed

    name = f"compare-{os.getpid()}-{next(_ring_names)}"
    command = [
        str(rf.binary), "serve", "--config", str(rf.config),
        "--shards", *map(str, data.shards),
        "--name", name, "--batch-size", str(data.batch_size), "--workers", str(workers),
        "--epochs", str(work.warmup_epochs + work.timed_epochs), "--exit-when-done",
        "--status-interval", "3600",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        started = time.perf_counter()
        daemon = subprocess.Popen(command, cwd=rf.root, stdout=log, stderr=subprocess.STDOUT)
        try:
            with ringfeed.Loader(name, lane=0, wait_for_producer=60.0, timeout=120.0) as loader:
                if len(loader) != data.batches_per_epoch:
                    raise RuntimeError(
                        f"ringfeed serves {len(loader)} batches per epoch, "
                        f"expected {data.batches_per_epoch}"
                    )
                touch = _touch_ringfeed_mixed if policy else _touch_ringfeed
                timing = consume(lambda: loader, touch, work, started, lambda: [daemon.pid])
            code = daemon.wait(timeout=60)
        except BaseException:
            daemon.kill()
            daemon.wait()
            raise
        finally:
            log.seek(0)
            output = log.read().decode(errors="replace")
    if code != 0:
        raise RuntimeError(f"ringfeed serve exited with {code}:\n{output}")
    return timing


def _touch_ringfeed(batch: Any) -> int:
    float(batch.images.flat[0])
    int(batch.labels[0])
    return int(batch.count)


def _touch_ringfeed_mixed(batch: Any) -> int:
    float(batch.targets[0, 0])
    return _touch_ringfeed(batch)


# --- PyTorch DataLoader + torchvision (the reference ImageNet recipe) -----------------------


def torch_versions() -> dict[str, str]:
    """Versions of torch and torchvision; raises :class:`UnavailableError` when not installed."""
    try:
        import torch
        import torchvision
    except ImportError as err:
        raise UnavailableError(f"PyTorch/torchvision not installed ({err}); run setup.sh") from err
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def run_dataloader(
    data: Dataset, work: Workload, workers: int, seed: int, policy: bool = False
) -> Timing:
    """torchvision ImageFolder (PIL decode) + transforms v2, as torchvision's references do.
    With ``policy``: RandAugment on the PIL crop and RandomErasing after Normalize in the
    workers, then MixUp or CutMix (50/50) and label smoothing on each batch in the training
    loop, as torchvision's and timm's recipes do."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision.transforms import v2

    if data.imagefolder is None:
        raise UnavailableError("no ImageFolder tree beside the shards")
    steps: list[Any] = [
        v2.RandomResizedCrop(CROP, scale=SCALE, ratio=RATIO, antialias=True),
        v2.RandomHorizontalFlip(FLIP_P),
    ]
    if policy:
        steps.append(
            v2.RandAugment(RA_OPS, RA_MAGNITUDE, RA_BINS, fill=[124, 116, 104])  # type: ignore[arg-type]
        )
    steps += [v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if policy:
        steps.append(v2.RandomErasing(ERASE_P, value="random"))  # type: ignore[arg-type]
    transform = v2.Compose(steps)
    dataset = datasets.ImageFolder(str(data.imagefolder), transform=transform)
    torch.manual_seed(seed)
    started = time.perf_counter()
    loader = DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=True,
        drop_last=True,
    )
    touch = _mixing_touch(len(dataset.classes)) if policy else _touch_pair
    try:
        return consume(lambda: loader, touch, work, started, lambda: _worker_pids(loader))
    finally:
        _shutdown_workers(loader)


def _mixing_touch(classes: int) -> Any:
    """The training loop's batch mixing (torchvision v2 MixUp or CutMix, chosen 50/50 per
    batch, then label smoothing as timm's ``mixup_target``), then the usual touch."""
    from torchvision.transforms import v2

    mix = v2.RandomChoice(
        [
            v2.MixUp(alpha=MIXUP_ALPHA, num_classes=classes),
            v2.CutMix(alpha=CUTMIX_ALPHA, num_classes=classes),
        ]
    )

    def touch(batch: Any) -> int:
        images, targets = mix(*batch)
        targets = targets * (1 - SMOOTHING) + SMOOTHING / classes
        float(targets[0, 0])
        return _touch_pair((images, batch[1]))

    return touch


def _worker_pids(loader: Any) -> list[int]:
    """The persistent worker processes (alive between epochs)."""
    iterator = getattr(loader, "_iterator", None)
    return [w.pid for w in getattr(iterator, "_workers", [])]


def _shutdown_workers(loader: Any) -> None:
    """Stops persistent workers now, so they do not compete with the next system's run."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()


def _touch_pair(batch: Any) -> int:
    images, labels = batch
    float(images[0, 0, 0, 0])
    int(labels[0])
    return len(labels)


# --- NVIDIA DALI, CPU-only pipeline -------------------------------------------------------


def dali_version() -> dict[str, str]:
    """DALI's version; raises :class:`UnavailableError` with the reason when it cannot be used."""
    try:
        from nvidia import dali
    except Exception as err:  # an installed but broken DALI raises more than ImportError
        raise UnavailableError(f"NVIDIA DALI cannot be imported: {err!r}") from err
    return {"dali": str(dali.__version__)}


def run_dali(
    data: Dataset, work: Workload, threads: int, seed: int, policy: bool = False
) -> Timing:
    """DALI's ImageNet training pipeline on the CPU (``device_id=None``): file reader,
    ROI decode of the random crop, resize, flip + normalise to float CHW. With ``policy``:
    flip, then ``nvidia.dali.auto_aug.rand_augment`` on the uint8 crop, normalise, random
    erasing (a DALI conditional; per-pixel normal values) in the pipeline, and MixUp or CutMix
    with label smoothing on each batch in the training loop, as for the DataLoader."""
    import math

    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    if data.imagefolder is None:
        raise UnavailableError("no ImageFolder tree beside the shards")

    @pipeline_def(
        batch_size=data.batch_size,
        num_threads=threads,
        device_id=None,
        seed=seed,
        enable_conditionals=policy,
    )
    def train() -> Any:
        jpegs, labels = fn.readers.file(
            file_root=str(data.imagefolder), random_shuffle=True, name="Reader"
        )
        images = fn.decoders.image_random_crop(
            jpegs,
            device="cpu",
            output_type=types.RGB,
            random_area=list(SCALE),
            random_aspect_ratio=list(RATIO),
            num_attempts=10,
        )
        images = fn.resize(images, resize_x=CROP, resize_y=CROP, interp_type=types.INTERP_LINEAR)
        mirror = fn.random.coin_flip(probability=FLIP_P)
        if policy:
            from nvidia.dali.auto_aug import rand_augment

            # The flip comes before the policy (its shears do not commute with it), as in
            # torchvision's recipe. DALI's fill is one value for all channels.
            images = fn.flip(images, horizontal=mirror)
            images = rand_augment.rand_augment(
                images, n=RA_OPS, m=RA_MAGNITUDE, num_magnitude_bins=RA_BINS, fill_value=DALI_FILL
            )
            mirror = 0
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[m * 255 for m in MEAN],
            std=[s * 255 for s in STD],
            mirror=mirror,
        )
        if policy and fn.random.coin_flip(probability=ERASE_P):
            # torchvision's RandomErasing rectangle (area share and log-uniform aspect ratio),
            # clipped to the image instead of redrawn; standard normal values inside it.
            area = fn.random.uniform(range=[0.02, 0.33])
            aspect = dmath.exp(fn.random.uniform(range=[math.log(0.3), math.log(3.3)]))
            h = dmath.min(dmath.sqrt(area * aspect), 0.99)
            w = dmath.min(dmath.sqrt(area / aspect), 0.99)
            anchor = fn.stack(
                fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h),
                fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w),
            )
            keep = fn.erase(
                images * 0.0 + 1.0,
                anchor=anchor,
                shape=fn.stack(h, w),
                axis_names="HW",
                normalized_anchor=True,
                normalized_shape=True,
                fill_value=0.0,
            )
            images = images * keep + fn.random.normal(images) * (1.0 - keep)
        return images, labels

    started = time.perf_counter()
    pipe = train()
    pipe.build()

    def open_epoch() -> Iterator[Any]:
        # The reader wraps around the dataset by itself; an "epoch" is the same number of
        # full batches as every other loader delivers.
        for _ in range(data.batches_per_epoch):
            yield pipe.run()

    touch = _dali_mixing_touch(_classes(data.imagefolder)) if policy else _touch_dali
    return consume(open_epoch, touch, work, started)


def _classes(imagefolder: Path) -> int:
    """Classes of an ImageFolder tree (its sub-folders)."""
    return sum(1 for d in imagefolder.iterdir() if d.is_dir())


def _dali_mixing_touch(classes: int) -> Any:
    """The DataLoader's training-loop mixing (:func:`_mixing_touch`) on DALI's batches, viewed
    as torch tensors without a copy."""
    import numpy as np
    import torch

    mix = _mixing_touch(classes)

    def touch(batch: Any) -> int:
        images, labels = batch
        images = torch.from_numpy(np.asarray(images.as_tensor()))
        labels = torch.from_numpy(np.asarray(labels.as_tensor())).reshape(-1).long()
        return int(mix((images, labels)))

    return touch


def _touch_dali(batch: Any) -> int:
    import numpy as np

    images, labels = batch
    float(np.asarray(images[0]).flat[0])
    int(np.asarray(labels[0]).flat[0])
    return len(images)


# --- the physical floor: libjpeg-turbo full decode, one core, × cores -----------------------

_BENCH_ROWS = {
    FULL_DECODE: r"full decode only \(floor per core\)",
    FULL_DECODE_CPU: r"full decode only, per CPU second of the thread",
    "ROI decode + augment + write, one core": r"decode \+ augment \+ write \(ROI decode\)",
    "ROI decode + augment + write, per CPU second": r"same, per CPU second of the thread",
}


def bench_stages(rf: Ringfeed, data: Dataset, cores: int, repeats: int = 1) -> dict[str, float]:
    """``ringfeed bench`` on the same JPEGs: images/s of libjpeg-turbo full decode on one core
    (bytes already in memory, decode only: the floor) and of ringfeed's whole per-sample work on
    one core, each per second of wall time and per second of the thread's CPU time, and of its
    own in-process end-to-end run with ``cores`` workers."""
    command = [
        str(rf.binary), "bench", "--config", str(rf.config),
        "--shards", *map(str, data.shards),
        "--samples", str(data.images), "--repeats", str(repeats), "--batches", "2",
        "--batch-size", str(data.batch_size), "--workers", str(cores),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=rf.root, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"ringfeed bench exited with {result.returncode}:\n{result.stderr}")
    figures = {}
    for name, row in _BENCH_ROWS.items():
        match = re.search(rf"^\| {row} \| (\d+)", result.stdout, re.M)
        if match is None:
            raise RuntimeError(f"no '{name}' figure in ringfeed bench's output:\n{result.stdout}")
        figures[name] = float(match.group(1))
    match = re.search(r"^end to end through the ring, .*?: (\d+)", result.stdout, re.M)
    if match is None:
        raise RuntimeError(f"no end-to-end figure in ringfeed bench's output:\n{result.stdout}")
    figures["ringfeed bench end to end (in-process consumer)"] = float(match.group(1))
    return figures
