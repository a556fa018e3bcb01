#!/usr/bin/env python3
"""Reference outputs made with Pillow (+ numpy) for the decode and augment golden tests.

Usage:  python3 tests/golden/make_golden.py      (needs Pillow and numpy; CI does not run it)

decode/<fixture>.png  Pillow's decode of each fixture, EXIF-transposed, as lossless RGB PNG.
augment/<case>.png    torchvision-style deterministic transforms done with Pillow:
                      resize(shorter side, BILINEAR, reducing_gap=None) -> center crop ->
                      optional flips. Cases are listed in CASES (mirrored by tests/augment_golden.rs).
"""
import json
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT.parent / "fixtures"

DECODE = [
    "coffee_420.jpg",
    "chelsea_444.jpg",
    "rocket_progressive.jpg",
    "coffee_gray.jpg",
    "chelsea_cmyk.jpg",
    "coffee_orient6.jpg",
    "one_pixel.jpg",
    "astronaut_rgb.png",
    "astronaut_palette.png",
    "astronaut_gray_alpha.png",
    "rgb16.png",
    "one_pixel.png",
    "coffee_lossless.webp",
]

# name, fixture, resize shorter side (or [h, w] exact), center crop [h, w] (or None), hflip, vflip
CASES = [
    ("coffee_r128_c112", "coffee_420.jpg", 128, [112, 112], False, False),
    ("coffee_r100_c96x80_hflip", "coffee_420.jpg", 100, [96, 80], True, False),
    ("chelsea_r64_c64_vflip", "chelsea_444.jpg", 64, [64, 64], False, True),
    ("chelsea_exact_90x130", "chelsea_444.jpg", [90, 130], None, False, False),
    ("astronaut_r200_c160_upscale", "astronaut_rgb.png", 200, [160, 160], True, True),
    ("rocket_r57_c48", "rocket_progressive.jpg", 57, [48, 48], False, False),
]


def load(name: str) -> Image.Image:
    img = Image.open(FIXTURES / name)
    img = ImageOps.exif_transpose(img)
    if img.mode == "I;16" or img.mode == "I":
        raise SystemExit(f"{name}: 16-bit grayscale is not a golden case")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size):
    w, h = img.size
    if isinstance(size, list):
        return img.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=None)
    # torchvision: the shorter side becomes `size`, the longer one int(size * long / short).
    if w <= h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    return img.resize((ow, oh), Image.BILINEAR, reducing_gap=None)


def center_crop(img: Image.Image, crop):
    ch, cw = crop
    w, h = img.size
    # torchvision's center_crop rounding.
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def main() -> None:
    (ROOT / "decode").mkdir(exist_ok=True)
    (ROOT / "augment").mkdir(exist_ok=True)
    for name in DECODE:
        load(name).save(ROOT / "decode" / f"{name}.png")
    manifest = []
    for name, fixture, size, crop, hflip, vflip in CASES:
        img = resize_shorter(load(fixture), size)
        if crop is not None:
            img = center_crop(img, crop)
        if hflip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if vflip:
            img = img.transpose(Image.FLIP_TOP_BOTTOM)
        img.save(ROOT / "augment" / f"{name}.png")
        manifest.append(
            {"name": name, "fixture": fixture, "resize": size, "center_crop": crop,
             "hflip": hflip, "vflip": vflip}
        )
    (ROOT / "augment" / "cases.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
