#!/usr/bin/env python3
"""InfoBatch through ringfeed on real data: scikit-learn's bundled handwritten digits.

Trains a small CNN on CPU with ``[selection] mode = "none"`` and ``mode = "infobatch"``,
several seeds each, and reports held-out accuracy (mean ± sd), samples served and wall time.

The data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 scans, shipped inside the
package). A fixed stratified split keeps 30 % as the held-out set; the training part is
upscaled x4 (nearest) to 32x32 RGB PNGs in an ImageFolder tree and packed into shards with
``ringfeed pack``. The daemon serves random resized crops (scale 0.6–1) with ±10° rotation
at 16x16, normalised; the held-out images are the whole 32x32 image downscaled to 16x16
(2x2 means) and normalised the same way. The trainer multiplies each sample's loss by the
batch's ``weights`` and reports per-sample losses with ``loader.report``.

Usage::

    python3 benches/infobatch/digits.py --bin target/release/ringfeed          # the README table
    python3 benches/infobatch/digits.py --bin target/debug/ringfeed --smoke    # CI: seconds

Needs numpy, torch (CPU) and scikit-learn. Prints a Markdown table and writes JSON with
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))

import ringfeed

SIZE = 16
MEAN, STD = 0.5, 0.5


def png_rgb(pixels: np.ndarray) -> bytes:
    """A minimal RGB PNG (no Pillow needed)."""
    h, w, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def upscaled(image8: np.ndarray) -> np.ndarray:
    """8x8 values 0–16 → 32x32x3 uint8 (nearest x4)."""
    gray = np.clip(image8 * (255.0 / 16.0), 0, 255).astype(np.uint8)
    big = np.kron(gray, np.ones((4, 4), dtype=np.uint8))
    return np.repeat(big[:, :, None], 3, axis=2)


def prepare(work: Path, binary: Path) -> tuple[Path, np.ndarray, np.ndarray, int]:
    """Pack the training split; return (shard dir, held-out inputs, held-out labels, n)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images,
        digits.target,
        test_size=0.3,
        random_state=0,
        stratify=digits.target,
    )
    tree = work / "train"
    for i, (image, label) in enumerate(zip(x_train, y_train)):
        folder = tree / f"{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.png").write_bytes(png_rgb(upscaled(image)))
    shards = work / "shards"
    subprocess.run(
        [str(binary), "pack", str(tree), str(shards), "--samples-per-shard", "512"],
        check=True,
        capture_output=True,
    )
    test = np.stack([upscaled(im) for im in x_test]).astype(np.float32) / 255.0
    test = test.reshape(len(x_test), SIZE, 2, SIZE, 2, 3).mean(axis=(2, 4))
    test = ((test - MEAN) / STD).transpose(0, 3, 1, 2).copy()
    return shards, test, y_test.astype(np.int64), len(x_train)


def write_config(
    path: Path, shards: Path, mode: str, seed: int, epochs: int, batch: int
) -> None:
    path.write_text(f"""
[source]
kind = "tar"
shards = ["{shards}/*.tar"]
[sampling]
seed = {seed}
shuffle = "global"
drop-last = false
epochs = {epochs}
[batch]
size = {batch}
[augment]
random-resized-crop = {{ size = {SIZE}, scale = [0.6, 1.0], ratio = [0.8, 1.25] }}
rotate = {{ degrees = [-10.0, 10.0], p = 1.0 }}
normalize = {{ mean = [{MEAN}, {MEAN}, {MEAN}], std = [{STD}, {STD}, {STD}] }}
output = {{ dtype = "f32", layout = "nchw" }}
[ring]
lanes = 1
slots-per-lane = 4
[workers]
threads = 1
[selection]
mode = "{mode}"
prune-ratio = 0.5
anneal = 0.875
""")


def model() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def run(
    binary: Path,
    work: Path,
    shards: Path,
    test: tuple[np.ndarray, np.ndarray],
    mode: str,
    seed: int,
    epochs: int,
    batch: int,
    show_stat: bool = False,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    name = f"digits-{mode}-{seed}-{os.getpid()}"
    cfg = work / f"{name}.toml"
    write_config(cfg, shards, mode, seed, epochs, batch)
    runtime = Path(tempfile.mkdtemp(prefix="rf-digits-", dir="/tmp"))
    env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime)}
    log = (work / f"{name}.log").open("wb")
    daemon = subprocess.Popen(
        [
            str(binary),
            "serve",
            "-c",
            str(cfg),
            "--name",
            name,
            "--state-dir",
            str(work / f"state-{name}"),
            "--exit-when-done",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                loader = ringfeed.Loader(name, runtime_dir=runtime, timeout=120)
                break
            except ringfeed.AttachError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        net = model()
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        served = 0
        per_epoch = []
        started = time.perf_counter()
        with loader:
            for epoch in range(epochs):
                if show_stat and epoch == epochs - 2:
                    # What the daemon has learnt so far, as an operator sees it.
                    stat = subprocess.run(
                        [str(binary), "stat", name, "--once"],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    print(stat.stdout, flush=True)
                count = 0
                for b in loader:
                    images, labels = b.torch("images", "labels")
                    ids = b.sample_ids.copy()
                    losses = F.cross_entropy(net(images), labels, reduction="none")
                    if mode == "infobatch":
                        weights = b.torch("weights")[0]
                        loss = (losses * weights).mean()
                    else:
                        loss = losses.mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    loader.report(ids, losses.detach())
                    count += len(ids)
                per_epoch.append(count)
                served += count
        wall = time.perf_counter() - started
        net.eval()
        with torch.no_grad():
            logits = net(torch.from_numpy(test[0]))
            accuracy = float((logits.argmax(1).numpy() == test[1]).mean())
        daemon.wait(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)
    return {
        "mode": mode,
        "seed": seed,
        "accuracy": accuracy,
        "served": served,
        "per_epoch": per_epoch,
        "wall_s": wall,
    }


def summary(rows: list[dict[str, Any]], mode: str) -> dict[str, float]:
    picked = [r for r in rows if r["mode"] == mode]
    acc = [r["accuracy"] for r in picked]
    return {
        "runs": len(picked),
        "acc_mean": statistics.mean(acc),
        "acc_sd": statistics.stdev(acc) if len(acc) > 1 else 0.0,
        "served": statistics.mean(r["served"] for r in picked),
        "wall_s": statistics.mean(r["wall_s"] for r in picked),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bin", type=Path, default=REPO / "target" / "release" / "ringfeed"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 3 epochs: CI")
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--stat",
        action="store_true",
        help="print `ringfeed stat` before the last epochs",
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs = 1, 3
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="rf-digits-"))
    try:
        shards, x_test, y_test, n = prepare(work, args.bin.absolute())
        rows = []
        for seed in range(args.seeds):
            for mode in ("none", "infobatch"):
                row = run(
                    args.bin.absolute(),
                    work,
                    shards,
                    (x_test, y_test),
                    mode,
                    seed,
                    args.epochs,
                    args.batch,
                    show_stat=args.stat and seed == 0 and mode == "infobatch",
                )
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    none, ib = summary(rows, "none"), summary(rows, "infobatch")
    saved = 1 - ib["served"] / none["served"]
    print(
        f"\n{n} training samples, {len(y_test)} held out; {args.epochs} epochs, batch "
        f"{args.batch}, {args.seeds} seed(s)\n"
    )
    print("| mode | held-out accuracy (mean ± sd) | samples served | wall time (s) |")
    print("|---|---|---|---|")
    for label, s in (("none", none), ("infobatch (r = 0.5, δ = 0.875)", ib)):
        print(
            f"| {label} | {100 * s['acc_mean']:.2f} % ± {100 * s['acc_sd']:.2f} | "
            f"{s['served']:.0f} | {s['wall_s']:.1f} |"
        )
    print(f"\ninfobatch served {100 * saved:.1f} % fewer samples")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "none": none,
                    "infobatch": ib,
                    "saved": saved,
                    "epochs": args.epochs,
                    "seeds": args.seeds,
                },
                indent=1,
            )
        )
    if args.smoke:
        # The smoke checks the loop runs; epochs 0 prunes nothing, epoch 1 may.
        assert ib["served"] <= none["served"], (ib, none)
        assert none["acc_mean"] > 0.3, none
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
