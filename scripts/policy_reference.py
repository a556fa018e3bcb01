#!/usr/bin/env python3
"""Writes torchvision's outputs of every automatic-augmentation operation on fixed magnitudes
into tests/golden/policy/, the reference that src/augment/ops.rs's tests compare with.

Needs torch + torchvision (not installed by tests/setup.sh: the outputs are committed).
Run: python3 scripts/policy_reference.py   (torchvision 0.29.2 wrote the committed files)

Each operation is called exactly as torchvision.transforms.v2's policies call it
(`_AutoAugmentBase._apply_image_or_video_transform`, interpolation "nearest") on a uint8
[3, H, W] tensor. cases.txt lists: file, operation, magnitude, width, height, fill (r g b), and
the tolerance the Rust test allows (max abs difference, share of differing values); the
tolerances and why they are not zero are documented in src/augment/ops.rs.
"""
import pathlib

import numpy as np
import torch
import torchvision
from torchvision.transforms.v2 import AutoAugment

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "policy"

W, H = 40, 30


def make_input() -> np.ndarray:
    """A 40x30 RGB image with gradients, edges and noise (every value range represented)."""
    rng = np.random.default_rng(18)
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    r = 40 + 150 * x / (W - 1) + rng.normal(0, 12, (H, W))
    g = 30 + 170 * y / (H - 1) + rng.normal(0, 12, (H, W))
    b = np.where((x // 8 + y // 6) % 2 == 0, 60.0, 190.0) + rng.normal(0, 20, (H, W))
    img = np.stack([r, g, b], axis=-1)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# (operation, magnitude, width, height, fill); the tolerance comes from TOLERANCE below
CASES = [
    ("Identity", 0.0, W, H, None),
    ("ShearX", 0.3, W, H, None),
    ("ShearX", -0.17, W, H, None),
    ("ShearY", 0.27, W, H, None),
    ("ShearY", -0.99, W, H, (128, 64, 32)),
    ("TranslateX", 13.6, W, H, None),
    ("TranslateX", -5.2, W, H, (10, 20, 30)),
    ("TranslateY", 7.9, W, H, None),
    ("TranslateY", -12.0, W, H, None),
    ("Rotate", 30.0, W, H, None),
    ("Rotate", -17.5, W, H, (255, 0, 128)),
    ("Rotate", 135.0, W, H, None),
    ("Rotate", 180.0, W, H, None),
    ("Rotate", 90.0, H, H, None),
    ("Rotate", -90.0, H, H, None),
    ("Rotate", 90.0, W, H, None),
    ("Brightness", 0.9, W, H, None),
    ("Brightness", -0.45, W, H, None),
    ("Color", 0.9, W, H, None),
    ("Color", -0.63, W, H, None),
    ("Contrast", 0.99, W, H, None),
    ("Contrast", -0.5, W, H, None),
    ("Sharpness", 0.9, W, H, None),
    ("Sharpness", -0.72, W, H, None),
    ("Posterize", 7, W, H, None),
    ("Posterize", 4, W, H, None),
    ("Posterize", 2, W, H, None),
    ("Solarize", 0.7, W, H, None),
    ("Solarize", 0.3, W, H, None),
    ("Solarize", 1.0, W, H, None),
    ("AutoContrast", 0.0, W, H, None),
    ("Equalize", 0.0, W, H, None),
    ("Invert", 0.0, W, H, None),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    img = make_input()
    (OUT / "input.rgb").write_bytes(img.tobytes())
    flat = img.reshape(-1)
    aa = AutoAugment()
    lines = [
        f"# torchvision {torchvision.__version__}, torch {torch.__version__}: scripts/policy_reference.py",
        "# file op magnitude width height fill_r fill_g fill_b max_abs_diff max_share_differing",
    ]
    for i, (op, mag, w, h, fill) in enumerate(CASES):
        hwc = flat[: w * h * 3].reshape(h, w, 3)
        chw = torch.from_numpy(hwc.copy()).permute(2, 0, 1).contiguous()
        out = aa._apply_image_or_video_transform(
            chw, op, float(mag), interpolation="nearest",
            fill={torch.Tensor: None if fill is None else list(map(float, fill))},
        )
        name = f"{i:02d}_{op}.rgb"
        (OUT / name).write_bytes(out.permute(1, 2, 0).contiguous().numpy().tobytes())
        f = fill or (0, 0, 0)
        tol = TOLERANCE.get(op, (0, 0.0))
        lines.append(f"{name} {op} {mag} {w} {h} {f[0]} {f[1]} {f[2]} {tol[0]} {tol[1]}")
    (OUT / "cases.txt").write_text("\n".join(lines) + "\n")


# Per-operation tolerance where ringfeed is not bit-identical (none today: every case matches
# torchvision 0.29.2 exactly; src/augment/ops.rs says which sums could still differ).
TOLERANCE: dict = {}

if __name__ == "__main__":
    main()
