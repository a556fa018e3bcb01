#!/usr/bin/env python3
"""Builds ringfeed's bundled sample dataset: 96 JPEG crops of 8 permissively licensed
photographs from the scikit-image wheel, in two WebDataset tar shards.

Usage (deterministic for a given Pillow / libjpeg-turbo):

    pip download scikit-image==0.26.0 --no-deps -d /tmp/skw
    unzip -q /tmp/skw/scikit_image-0.26.0-*.whl 'skimage/data/*' -d /tmp/skw/ex
    python3 data/sample/make_sample.py --source-dir /tmp/skw/ex/skimage/data

Needs numpy and Pillow. Writes shard-000000.tar, shard-000001.tar, classes.txt and SHA256SUMS
next to this script. See README.md for provenance and licences.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20240611
N_SAMPLES = 96
PER_SHARD = 48

# (file in skimage/data, sha256 of that file in scikit-image 0.26.0). The label is the
# position in this list; CLASSES names it (written to classes.txt, read by `ringfeed peek`).
SOURCES = [
    ("astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    ("chelsea.png", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    ("coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    ("rocket.jpg", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    ("hubble_deep_field.jpg", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    ("retina.jpg", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    ("camera.png", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    ("coins.png", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba"),
]
CLASSES = ["astronaut", "cat", "coffee", "rocket", "deep_field", "retina", "camera", "coins"]


def load_sources(source_dir: Path) -> list[Image.Image]:
    images = []
    for name, sha in SOURCES:
        data = (source_dir / name).read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise SystemExit(f"{name}: sha256 {got} differs from the pinned {sha}")
        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


def make_sample(i: int, label: int, src: Image.Image) -> tuple[bytes, dict[str, object]]:
    """One JPEG: a random crop (30-100 % of the area, aspect 3/4-4/3) resized so that its
    shorter side is 160-400 px, quality 85-95, 4:2:0, every 16th progressive."""
    rng = np.random.default_rng([SEED, i])
    w, h = src.size
    area = rng.uniform(0.3, 1.0) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = int(min(w, round((area * aspect) ** 0.5)))
    ch = int(min(h, round((area / aspect) ** 0.5)))
    x = int(rng.integers(0, w - cw + 1))
    y = int(rng.integers(0, h - ch + 1))
    short = int(rng.integers(160, 401))
    scale = short / min(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    img = src.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.LANCZOS)
    quality = int(rng.integers(85, 96))
    progressive = i % 16 == 5
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, subsampling=2, progressive=progressive, optimize=False)
    meta = {"crop": (x, y, cw, ch), "size": size, "quality": quality, "progressive": progressive}
    return out.getvalue(), meta


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-dir", type=Path, required=True, help="the wheel's skimage/data")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    sources = load_sources(args.source_dir)
    # Balanced classes, interleaved as a shuffled shard would be.
    labels = np.random.default_rng(SEED).permutation(
        np.arange(N_SAMPLES) % len(SOURCES)
    ).tolist()
    sums = []
    for shard_no in range(N_SAMPLES // PER_SHARD):
        path = args.out_dir / f"shard-{shard_no:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard_no * PER_SHARD, (shard_no + 1) * PER_SHARD):
                jpeg, meta = make_sample(i, labels[i], sources[labels[i]])
                key = f"sample_{i:06d}"
                add_member(tar, f"{key}.jpg", jpeg)
                add_member(tar, f"{key}.cls", f"{labels[i]}\n".encode())
                print(key, SOURCES[labels[i]][0], meta, len(jpeg))
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    classes = args.out_dir / "classes.txt"
    classes.write_text("".join(f"{name}\n" for name in CLASSES))
    sums.append(f"{hashlib.sha256(classes.read_bytes()).hexdigest()}  {classes.name}\n")
    (args.out_dir / "SHA256SUMS").write_text("".join(sums))


if __name__ == "__main__":
    main()
