#!/usr/bin/env python3
"""Object storage against local disk, in the same run: images/s of `ringfeed serve` on the
same shards read from a local directory and from a local S3 server (moto_server) behind the
fault proxy adding a fixed latency to every request (20 ms by default).

Per repetition (median of --repeats, the runs interleaved):
  start-up   daemon spawned -> first batch taken, cold shard cache, indexes cached locally
  cold       images/s of epoch 0, the shard cache empty at start (first batch -> epoch end)
  warm       images/s of the later epochs of the same run (every shard in the cache)
and two more remote runs of one epoch, for start-up only: `fetch-ahead = 0` (the first batch
waits for whole shards instead of ranged reads of its members), and a new node (empty index
directory: the indexes come from the bucket).
The ratios remote/local are what to compare: the machine is shared and noisy.

Shards: /work/shared/data/photos-dev/shards when present, else the bundled sample; their
members are regrouped into --shards shards in a temporary directory (nothing is written
into the repository). Needs moto_server (pip install 'moto[server]') and a built ringfeed
(--bin, else $RINGFEED_BIN, else target/release/ringfeed, else target/debug/ringfeed).

    python3 benches/remote/remote.py                       # the README's figures
    python3 benches/remote/remote.py --repeats 1 --epochs 2 # a smoke run, seconds
"""

import argparse
import glob
import http.client
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTOS = "/work/shared/data/photos-dev/shards"
BUCKET = "bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def source_shards():
    """The input shards: photos-dev when present, else the bundled sample."""
    found = sorted(glob.glob(os.path.join(PHOTOS, "*.tar")))
    if found:
        return found, "photos-dev"
    found = sorted(glob.glob(os.path.join(ROOT, "assets", "sample", "**", "*.tar"), recursive=True))
    if not found:
        sys.exit("no shards: neither photos-dev nor the bundled sample (assets/sample)")
    return found, "bundled sample"


def regroup(inputs, count, out_dir):
    """Writes the inputs' samples (members grouped by key) into `count` shards."""
    samples = []
    for path in inputs:
        with tarfile.open(path) as t:
            by_key = {}
            for m in t.getmembers():
                if m.isfile():
                    key = m.name.rsplit(".", 1)[0]
                    by_key.setdefault(key, []).append((m, t.extractfile(m).read()))
            samples.extend(by_key.values())
    per = -(-len(samples) // count)
    paths = []
    for s in range(count):
        path = os.path.join(out_dir, f"shard-{s:06d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
            for members in samples[s * per : (s + 1) * per]:
                for info, data in members:
                    info.mtime = 0
                    t.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths, len(samples)


class S3:
    """moto_server and the latency proxy in front of it."""

    def __init__(self, latency_ms, work):
        self.upstream_port = free_port()
        self.moto = subprocess.Popen(
            ["moto_server", "-H", "127.0.0.1", "-p", str(self.upstream_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.upstream_port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("moto_server did not start")
                time.sleep(0.05)
        control = os.path.join(work, "faults.json")
        with open(control, "w") as f:
            json.dump({"latency_ms": latency_ms}, f)
        self.proxy = subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "tests", "fault_support", "s3_proxy.py"),
                "--upstream",
                f"127.0.0.1:{self.upstream_port}",
                "--control",
                control,
                "--server-pid",
                str(self.moto.pid),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        line = self.proxy.stdout.readline().decode()
        self.port = int(line.split()[1])

    def put(self, path, body):
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        conn.request("PUT", path, body=body)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"PUT {path}: {resp.status}")

    def env(self):
        env = dict(os.environ)
        env.update(
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{self.port}",
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_REGION="us-east-1",
        )
        return env

    def close(self):
        for p in (self.proxy, self.moto):
            p.kill()
            p.wait()


CONFIG = """
[source]
kind = "tar"
shards = ["{spec}"]
index-dir = "{index}"
{extra}

[sampling]
seed = 1
shuffle = "{shuffle}"
drop-last = true

[batch]
size = {batch}

[augment]
random-resized-crop = {{ size = 224 }}
horizontal-flip = {{ p = 0.5 }}
normalize = {{ mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}

[ring]
name = "{name}"
slots-per-lane = 4

[workers]
status-interval-s = 60
"""


def run(binary, cfg, name, epochs, env, workers):
    """One daemon run to the end: (start-up s, per-epoch (first, last) batch times, images)."""
    runtime = tempfile.mkdtemp(prefix="rfbench-rt-")
    env = dict(env, RINGFEED_RUNTIME_DIR=runtime)
    t0 = time.monotonic()
    args = [binary, "serve", "--config", cfg, "--epochs", str(epochs), "--exit-when-done", "--lanes", "1"]
    if workers:
        args += ["--workers", str(workers)]
    daemon = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    consumer = subprocess.Popen(
        [binary, "consume", name, "--digest", "--wait", "120"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    epochs_seen = {}
    images = {}
    first = None
    for line in consumer.stdout:
        now = time.monotonic()
        words = line.split()
        if not words or words[0] != "epoch":
            continue
        first = first or now
        epoch, count = int(words[1]), int(words[5])
        start, _ = epochs_seen.get(epoch, (now, now))
        epochs_seen[epoch] = (start, now)
        images[epoch] = images.get(epoch, 0) + count
    consumer.wait()
    _, err = daemon.communicate(timeout=120)
    shutil.rmtree(runtime, ignore_errors=True)
    if daemon.returncode != 0 or first is None:
        sys.exit(f"{name}: daemon failed ({daemon.returncode}):\n{err.decode()[-3000:]}")
    return first - t0, epochs_seen, images, err.decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=None)
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="per run: epoch 0 cold, the rest warm")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="--workers of serve (0: the default)")
    ap.add_argument("--shuffle", default="block", help="block, buffer, global or none")
    ap.add_argument("--fetch-ahead", type=int, default=None, help="[source] fetch-ahead (default: ringfeed's)")
    args = ap.parse_args()
    binary = args.bin or os.environ.get("RINGFEED_BIN")
    if not binary:
        for profile in ("release", "debug"):
            candidate = os.path.join(ROOT, "target", profile, "ringfeed")
            if os.path.exists(candidate):
                binary = candidate
                break
    if not binary:
        sys.exit("no ringfeed binary: cargo build --release, or --bin")

    work = tempfile.mkdtemp(prefix="rfbench-remote-")
    s3 = None
    try:
        inputs, origin = source_shards()
        shard_dir = os.path.join(work, "shards")
        os.makedirs(shard_dir)
        paths, n = regroup(inputs, args.shards, shard_dir)
        s3 = S3(args.latency_ms, work)
        s3.put(f"/{BUCKET}", b"")
        for p in paths:
            with open(p, "rb") as f:
                s3.put(f"/{BUCKET}/train/{os.path.basename(p)}", f.read())
        last = f"{args.shards - 1:06d}"
        fetch = "" if args.fetch_ahead is None else f"fetch-ahead = {args.fetch_ahead}"

        def config(kind, rep):
            name = f"bench-{kind}-{rep}"
            index = os.path.join(work, "index-local" if kind == "local" else "index-remote")
            if kind == "newnode":
                index = os.path.join(work, f"index-{name}")
            if kind == "local":
                spec = os.path.join(shard_dir, f"shard-{{000000..{last}}}.tar")
                extra = ""
            else:
                spec = f"s3://{BUCKET}/train/shard-{{000000..{last}}}.tar"
                ahead = "fetch-ahead = 0" if kind == "whole" else fetch
                extra = f'cache-dir = "{os.path.join(work, "cache", name)}"\nallow-http = true\n{ahead}'
            path = os.path.join(work, f"{name}.toml")
            with open(path, "w") as f:
                f.write(
                    CONFIG.format(
                        spec=spec,
                        index=index,
                        extra=extra,
                        shuffle=args.shuffle,
                        batch=args.batch,
                        name=name,
                    )
                )
            return path, name

        env = {"local": dict(os.environ), "remote": s3.env(), "whole": s3.env(), "newnode": s3.env()}
        # Index once (and put the indexes into the bucket); not measured.
        for kind in ("local", "remote"):
            cfg, name = config(kind, "index")
            run(binary, cfg, name, 1, env[kind], args.workers)
        results = {"local": [], "remote": [], "whole": [], "newnode": []}
        for rep in range(args.repeats):
            for kind in ("local", "remote", "whole", "newnode"):
                cfg, name = config(kind, rep)
                epochs = args.epochs if kind in ("local", "remote") else 1
                startup, seen, images, _log = run(binary, cfg, name, epochs, env[kind], args.workers)
                # The first batch is the clock's start: its images are not counted.
                cold = (images[0] - args.batch) / (seen[0][1] - seen[0][0])
                warm = (
                    sum(images[e] for e in range(1, epochs)) / (seen[epochs - 1][1] - seen[0][1])
                    if epochs > 1
                    else float("nan")
                )
                results[kind].append({"startup_s": startup, "cold": cold, "warm": warm})
                print(
                    f"  {kind:7s} rep {rep}: start-up {startup:.2f} s, epoch 0 {cold:.0f} images/s, "
                    f"later epochs {warm:.0f} images/s",
                    flush=True,
                )

        def med(kind, key):
            return statistics.median(r[key] for r in results[kind])

        print(
            f"\n{n} samples in {args.shards} shards ({origin}), batch {args.batch}, shuffle "
            f"{args.shuffle}, {args.latency_ms:g} ms added per request, {binary}; "
            f"median of {args.repeats}"
        )
        print(f"{'':28s}{'local':>10s}{'s3://':>10s}{'ratio':>8s}")
        for key, label in (("cold", "epoch 0 (cold cache), img/s"), ("warm", "warm cache, img/s")):
            lo, re_ = med("local", key), med("remote", key)
            print(f"{label:28s}{lo:10.0f}{re_:10.0f}{re_ / lo:8.2f}")
        lo, re_ = med("local", "startup_s"), med("remote", "startup_s")
        print(f"{'start-up to 1st batch, s':28s}{lo:10.2f}{re_:10.2f}")
        print(f"{'  s3://, fetch-ahead = 0':28s}{'':10s}{med('whole', 'startup_s'):10.2f}")
        print(f"{'  s3://, indexes in bucket':28s}{'':10s}{med('newnode', 'startup_s'):10.2f}")
    finally:
        if s3:
            s3.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
