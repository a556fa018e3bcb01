#!/usr/bin/env python3
"""Scale of the dataset index: the daemon's resident memory per sample and its start-up time with
cached indexes, on a generated dataset of a million tiny samples.

It writes `--samples` samples (default 1,000,000) as tar shards of `--per-shard` samples into a
temporary directory (`--tmp`, default /tmp; about 2 KiB of tar per sample, 2 GB for a million,
deleted at the end), each sample a tiny valid JPEG (16×16, the same few hundred bytes for every
sample) and a `.cls` label (1000 classes), named like a real shard set
(`shard-000123/sample_000123456.jpg`). `ringfeed index` builds the sidecar indexes once (timed:
the cold build). Then, `--repeats` times each, for the big dataset and for a 96-sample one:

* `ringfeed index --memory` opens the shards as one dataset from the cached indexes and caches two
  epochs' orders, as the daemon does, and prints its RssAnon: the index and the orders alone
  (the figure the ≤ 32 bytes a sample target is about);
* `ringfeed serve --lanes 2` starts with the indexes cached; start-up is the time from the
  process start to its "serving ring" line (datasets opened from the indexes, ring created);
* one consumer takes a batch of epoch 0 on lane 0 and another resumes lane 1 at epoch 1, so the
  daemon holds the dataset's index and the two cached epoch orders it keeps (an epoch boundary
  can have local ranks one epoch apart);
* the daemon's RssAnon (resident memory without the ring's shared pages) is read from
  /proc/PID/status. Besides the index and the orders, the daemon keeps 12 bytes a sample of
  loss-feedback state (docs/feedback.md: a 4-byte score and the 8-byte parameter log the
  workers write), so its figure is that much higher.

Per sample = (median RssAnon of the big run − median of the 96-sample run) / (difference in
samples): what each added sample costs, without the fixed cost of threads and buffers. The
start-up figure is the big run's median minus the small one's, per million samples. Both are
extrapolated linearly to 100 million samples. Exit status 0 when the targets hold (≤ 32 bytes a
sample, ≤ 1 s per million samples), 1 otherwise.

Usage (release build first):

    cargo build --release
    python3 benches/index_scale/index_scale.py            # a million samples
    python3 benches/index_scale/index_scale.py --samples 200000 --json out.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python" / "src"))

import ringfeed

SMALL = 96
TARGET_BYTES_PER_SAMPLE = 32.0
TARGET_STARTUP_S_PER_MILLION = 1.0


def tiny_jpeg() -> bytes:
    """A 16×16 JPEG, a few hundred bytes (made with Pillow)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 80, 40)).save(out, format="JPEG", quality=50)
    return out.getvalue()


def tar_member(name: str, data: bytes) -> bytes:
    """One ustar member: the 512-byte header and the data padded to a block."""
    header = bytearray(512)
    raw = name.encode()
    assert len(raw) < 100, name
    header[0 : len(raw)] = raw
    header[100:108] = b"0000644\0"
    header[108:116] = b"0000000\0"
    header[116:124] = b"0000000\0"
    header[124:136] = b"%011o\0" % len(data)
    header[136:148] = b"%011o\0" % 0
    header[148:156] = b" " * 8
    header[156:157] = b"0"
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    checksum = sum(header)
    header[148:156] = b"%06o\0 " % checksum
    pad = (-len(data)) % 512
    return bytes(header) + data + b"\0" * pad


def write_dataset(root: Path, samples: int, per_shard: int) -> str:
    """`samples` samples in shards of `per_shard`; returns the brace spec of the shards."""
    jpeg = tiny_jpeg()
    shards = (samples + per_shard - 1) // per_shard
    for s in range(shards):
        parts = []
        for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
            key = f"shard-{s:06}/sample_{i:09}"
            parts.append(tar_member(key + ".jpg", jpeg))
            parts.append(tar_member(key + ".cls", b"%d\n" % (i * 7919 % 1000)))
        parts.append(b"\0" * 1024)
        (root / f"shard-{s:06}.tar").write_bytes(b"".join(parts))
    return f"{root}/shard-{{000000..{shards - 1:06}}}.tar"


def write_config(path: Path, spec: str, name: str) -> None:
    path.write_text(
        f"""
[source]
kind = "tar"
shards = ["{spec}"]

[sampling]
seed = 7
drop-last = true

[batch]
size = 8

[augment]
random-resized-crop = {{ size = 16 }}
normalize = {{ mean = [0.5, 0.5, 0.5], std = [0.25, 0.25, 0.25] }}

[ring]
name = "{name}"
slots-per-lane = 2
"""
    )


def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/PID/status")


def serve_once(binary: str, config: Path, name: str, runtime: Path) -> dict[str, float]:
    """Starts the daemon, waits for "serving ring" (deadline 300 s), takes one batch of epoch 0
    on lane 0 and one of epoch 1 on lane 1, reads RssAnon, stops the daemon."""
    env = dict(
        os.environ, RINGFEED_RUNTIME_DIR=str(runtime), RUST_LOG="warn,ringfeed=info"
    )
    start = time.monotonic()
    proc = subprocess.Popen(
        [binary, "serve", "--config", str(config), "--lanes", "2", "--epochs", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        assert proc.stderr is not None
        startup = None
        for line in proc.stderr:
            if "serving ring" in line:
                startup = time.monotonic() - start
                break
            if time.monotonic() - start > 300:
                break
        if startup is None:
            raise RuntimeError(f"the daemon did not start serving (exit {proc.poll()})")
        with warnings.catch_warnings():
            # The epoch-1 state is a bare position (no fingerprint): warned about, on purpose.
            warnings.simplefilter("ignore")
            first = ringfeed.Loader(
                name, lane=0, runtime_dir=runtime, wait_for_producer=60
            )
            second = ringfeed.Loader(
                name,
                lane=1,
                runtime_dir=runtime,
                wait_for_producer=60,
                resume={"epoch": 1, "index": 0},
            )
        assert first.next_batch().epoch == 0
        assert second.next_batch().epoch == 1
        rss = rss_anon_kib(proc.pid)
        first.close()
        second.close()
        return {"startup_s": startup, "rss_anon_kib": rss}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def index_memory(binary: str, spec: str) -> dict[str, float]:
    """`ringfeed index --memory`: the open time and RssAnon with the dataset and two orders."""
    out = subprocess.run(
        [binary, "index", "--memory", spec], check=True, capture_output=True, text=True
    ).stdout
    found = re.search(
        r"opened in ([0-9.]+) s; RssAnon (\d+) KiB before, (\d+) KiB with", out
    )
    if not found:
        raise RuntimeError(
            f"unexpected `ringfeed index --memory` output:\n{out[-2000:]}"
        )
    return {"open_s": float(found[1]), "rss_anon_kib": int(found[3])}


def measure(
    binary: str, root: Path, samples: int, per_shard: int, repeats: int
) -> dict[str, Any]:
    data = root / f"data-{samples}"
    data.mkdir()
    t0 = time.monotonic()
    spec = write_dataset(data, samples, per_shard)
    written_s = time.monotonic() - t0
    t0 = time.monotonic()
    subprocess.run([binary, "index", spec], check=True, stdout=subprocess.DEVNULL)
    index_s = time.monotonic() - t0
    opens = [index_memory(binary, spec) for _ in range(repeats)]
    config = root / f"scale{samples}.toml"
    name = f"scale{samples}"
    write_config(config, spec, name)
    runs = []
    for _ in range(repeats):
        runtime = Path(tempfile.mkdtemp(dir=root, prefix="rt-"))
        runs.append(serve_once(binary, config, name, runtime))
        shutil.rmtree(runtime, ignore_errors=True)
    index_bytes = sum(p.stat().st_size for p in data.glob("*.tar.idx"))
    shard_bytes = sum(p.stat().st_size for p in data.glob("*.tar"))
    shutil.rmtree(data)
    return {
        "samples": samples,
        "write_s": written_s,
        "index_build_s": index_s,
        "index_file_bytes": index_bytes,
        "shard_bytes": shard_bytes,
        "runs": runs,
        "startup_s": statistics.median(r["startup_s"] for r in runs),
        "rss_anon_kib": statistics.median(r["rss_anon_kib"] for r in runs),
        "index_runs": opens,
        "index_open_s": statistics.median(o["open_s"] for o in opens),
        "index_rss_anon_kib": statistics.median(o["rss_anon_kib"] for o in opens),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "ringfeed"))
    parser.add_argument("--tmp", default="/tmp")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.tmp, prefix="ringfeed-index-scale-"))
    try:
        small = measure(args.bin, root, SMALL, SMALL, args.repeats)
        big = measure(args.bin, root, args.samples, args.per_shard, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    added = big["samples"] - small["samples"]
    index_per_sample = (
        (big["index_rss_anon_kib"] - small["index_rss_anon_kib"]) * 1024 / added
    )
    per_sample = (big["rss_anon_kib"] - small["rss_anon_kib"]) * 1024 / added
    startup_per_million = (big["startup_s"] - small["startup_s"]) * 1e6 / added
    result = {
        "small": small,
        "big": big,
        "index_bytes_per_sample": index_per_sample,
        "daemon_bytes_per_sample": per_sample,
        "startup_s_per_million": startup_per_million,
        "at_100m": {
            "index_rss_anon_gib": index_per_sample * 1e8 / 2**30,
            "daemon_rss_anon_gib": per_sample * 1e8 / 2**30,
            "startup_s": startup_per_million * 100,
            "index_file_gib": big["index_file_bytes"] / big["samples"] * 1e8 / 2**30,
        },
    }
    print(
        f"{big['samples']:,} samples in {big['shard_bytes'] / 2**30:.2f} GiB of shards; "
        f"indexes {big['index_file_bytes'] / big['samples']:.1f} bytes/sample on disk, "
        f"built cold in {big['index_build_s']:.1f} s"
    )
    print(
        f"index + 2 epoch orders (ringfeed index --memory): RssAnon "
        f"{small['index_rss_anon_kib'] / 1024:.1f} MiB ({SMALL} samples) → "
        f"{big['index_rss_anon_kib'] / 1024:.1f} MiB: {index_per_sample:.1f} bytes/sample "
        f"(target ≤ {TARGET_BYTES_PER_SAMPLE:.0f}) → "
        f"{result['at_100m']['index_rss_anon_gib']:.2f} GiB at 100 M samples; opened in "
        f"{big['index_open_s']:.2f} s"
    )
    print(
        f"daemon (ringfeed serve, 2 lanes at epochs 0 and 1): RssAnon "
        f"{small['rss_anon_kib'] / 1024:.1f} MiB → {big['rss_anon_kib'] / 1024:.1f} MiB: "
        f"{per_sample:.1f} bytes/sample, of which 12 are loss-feedback state → "
        f"{result['at_100m']['daemon_rss_anon_gib']:.2f} GiB at 100 M samples"
    )
    print(
        f"start-up with cached indexes: {small['startup_s']:.2f} s ({SMALL} samples) → "
        f"{big['startup_s']:.2f} s: {startup_per_million:.2f} s per million samples "
        f"(target ≤ {TARGET_STARTUP_S_PER_MILLION:.0f}) → {result['at_100m']['startup_s']:.0f} s "
        f"at 100 M samples"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    ok = (
        index_per_sample <= TARGET_BYTES_PER_SAMPLE
        and startup_per_million <= TARGET_STARTUP_S_PER_MILLION
    )
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
