#!/usr/bin/env python3
"""Writes the small seed inputs of the fuzz targets that Python makes best: tiny images of
every kind the decoder handles, tar shards in the GNU and pax dialects, labels and member names.

Usage: python3 fuzz/make_seeds.py   (needs Pillow; deterministic)

The other seeds come from elsewhere: small images copied from tests/fixtures/ (listed in
FIXTURES below), and the ring header and ustar shards made by the library itself
(`cargo test --test fuzz_replay -- --ignored write_seeds`).
"""
import io
import shutil
import tarfile
from pathlib import Path

from PIL import Image

FUZZ = Path(__file__).resolve().parent
FIXTURES = [
    "one_pixel.jpg", "one_pixel.png", "rocket_progressive.jpg", "rocket_arith_progressive.jpg",
    "coffee_lossless.webp", "gray16.png", "palette_trns.png", "tall_1x100000.png", "bomb.png",
    "bomb_65535.jpg", "zero_height.jpg",
]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(target: str, name: str, data: bytes) -> None:
    (FUZZ / "seeds" / target / name).write_bytes(data)


def tiny() -> Image.Image:
    img = Image.new("RGB", (12, 10))
    img.putdata([(x * 20, y * 25, (x * y) % 256) for y in range(10) for x in range(12)])
    return img


def shard(fmt: int, members: list) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def main() -> None:
    for name in FIXTURES:
        shutil.copy(FUZZ.parent / "tests/fixtures" / name, FUZZ / "seeds/decode" / name)
    img = tiny()
    write("decode", "tiny_420.jpg", encode(img, "JPEG", quality=80, subsampling=2))
    write("decode", "tiny_444.jpg", encode(img, "JPEG", quality=80, subsampling=0))
    write("decode", "tiny_gray.jpg", encode(img.convert("L"), "JPEG"))
    write("decode", "tiny_cmyk.jpg", encode(img.convert("CMYK"), "JPEG"))
    write("decode", "tiny_progressive.jpg", encode(img, "JPEG", progressive=True))
    exif = Image.Exif()
    exif[0x0112] = 6
    write("decode", "tiny_orient6.jpg", encode(img, "JPEG", exif=exif.tobytes()))
    write("decode", "tiny_la.png", encode(img.convert("LA"), "PNG"))
    write("decode", "tiny_rgba.png", encode(img.convert("RGBA"), "PNG"))
    write("decode", "tiny_interlaced.png", encode(img, "PNG", interlace=1))
    write("decode", "tiny_lossy.webp", encode(img, "WEBP", quality=50))
    write("decode", "tiny_alpha.webp", encode(img.convert("RGBA"), "WEBP", lossless=True))

    jpg = encode(img, "JPEG", quality=50)
    long_key = "dir/" + "k" * 120
    write("tar_reader", "gnu_long_names.tar",
          shard(tarfile.GNU_FORMAT, [(long_key + ".jpg", jpg), (long_key + ".cls", b"7\n")]))
    write("tar_reader", "pax.tar",
          shard(tarfile.PAX_FORMAT, [("p\u00e4x/" + "q" * 110 + ".png", b"\x89PNG"),
                                     ("p\u00e4x/" + "q" * 110 + ".cls", b" 12 ")]))

    for name, text in [
        ("plain", "3\n"), ("negative", " -12 "), ("too_big", "99999999999999999999"),
        ("member", "a/b/img_01.seg.png"), ("dotted", "./x/../y.cls"),
    ]:
        write("label", name, text.encode())


if __name__ == "__main__":
    main()
