#!/usr/bin/env python3
"""What ``Loader.report`` costs the training step: median time per call for a batch of 256
losses, from numpy arrays and from torch CPU tensors, against a real daemon; and, with
``--distributed``, the cost of the all-gather across 2 ranks (gloo on CPU) that ``report``
adds when ``torch.distributed`` is initialised.

Usage::

    python3 benches/infobatch/report_cost.py --bin target/debug/ringfeed [--distributed]

Budget (issue 16): ≤ 20 µs + ~1 µs per sample, i.e. ≤ ~276 µs for 256 samples.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "clients" / "python" / "src"))

import ringfeed
from ringfeed import feedback

BATCH = 256


def median_us(calls: int, fn) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def local(binary: Path, calls: int) -> None:
    runtime = Path(tempfile.mkdtemp(prefix="rf-cost-", dir="/tmp"))
    env = {**os.environ, "RINGFEED_RUNTIME_DIR": str(runtime)}
    name = f"cost-{os.getpid()}"
    daemon = subprocess.Popen(
        [str(binary), "serve", "--name", name, "--workers", "1", "--batch-size", "8"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                loader = ringfeed.Loader(name, runtime_dir=runtime)
                break
            except ringfeed.AttachError:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with loader:
            next(iter(loader))
            n = loader.layout.samples_per_epoch
            rng = np.random.default_rng(0)
            ids = rng.integers(0, n, BATCH)
            losses = rng.random(BATCH).astype(np.float32)
            print(
                f"numpy int64 + float32, {BATCH} samples: median "
                f"{median_us(calls, lambda: loader.report(ids, losses)):.1f} µs per call"
            )
            try:
                import torch
            except ImportError:
                return
            tids, tlosses = torch.from_numpy(ids), torch.from_numpy(losses)
            print(
                f"torch CPU tensors, {BATCH} samples: median "
                f"{median_us(calls, lambda: loader.report(tids, tlosses)):.1f} µs per call"
            )
            print(f"(frames still queued in the loader: {len(loader._outbox)} bytes)")
    finally:
        daemon.terminate()
        daemon.wait()


def _rank(rank: int, world: int, port: int, calls: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ids = np.arange(BATCH, dtype=np.int64) + rank * BATCH
    losses = np.ones(BATCH, dtype=np.float32)
    for _ in range(20):
        feedback.all_gather(dist, ids, losses)
    us = median_us(calls, lambda: feedback.all_gather(dist, ids, losses))
    if rank == 0:
        print(
            f"all-gather across {world} ranks (gloo, CPU), {BATCH} samples each: median "
            f"{us:.1f} µs per report"
        )
    dist.destroy_process_group()


def distributed(calls: int) -> None:
    import torch.multiprocessing as mp

    port = 29500 + os.getpid() % 1000
    mp.spawn(_rank, args=(2, port, calls), nprocs=2, join=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bin", type=Path, default=REPO / "target" / "release" / "ringfeed"
    )
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args()
    local(args.bin.absolute(), args.calls)
    if args.distributed:
        distributed(min(args.calls, 2000))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
