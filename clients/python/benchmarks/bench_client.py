"""Python-side cost of one batch: fetch + numpy (and torch, when installed) views + release.

The reference producer (tests/ring_writer.py) runs in-process and publishes between timed
iterations, so only the consumer's work is measured: scanning the lane's slots, taking the
slot, building the views, releasing (format 2.0: a lane-page store and a doorbell write) and
the lane-page bookkeeping.

    python benchmarks/bench_client.py [--iterations 2000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ringfeed
from ring_writer import RingWriter

CASES = {
    "256x3x224x224 f32": (256, (3, 224, 224)),
    "64x3x32x32 f32": (64, (3, 32, 32)),
}


def bench(
    batch_size: int, image_shape: tuple[int, ...], iterations: int, use_torch: bool
) -> list[float]:
    directory = tempfile.mkdtemp(prefix="rf-bench-", dir="/tmp")
    writer = RingWriter("bench", directory, slots=2, batch_size=batch_size,
                        image_shape=image_shape, batches_per_epoch=10**9, epochs=0,
                        fill=False)  # fmt: skip
    writer.serve()
    samples: list[float] = []
    try:
        with ringfeed.Loader("bench", runtime_dir=directory, release_previous=False) as loader:
            for i in range(iterations + 50):
                writer.publish(0)
                started = time.perf_counter_ns()
                batch = loader.next_batch()
                images, labels, ids = batch.images, batch.labels, batch.sample_ids
                if use_torch:
                    batch.torch()
                batch.release()
                elapsed = time.perf_counter_ns() - started
                if i >= 50:  # warm-up: first touch of each slot builds its cached arrays
                    samples.append(elapsed / 1000)
                del images, labels, ids
    finally:
        writer.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()
    try:
        import torch  # noqa: F401

        modes = [False, True]
    except ImportError:
        modes = [False]
    print(f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cpus")
    print(f"{'batch':<20} {'views':<12} {'median µs':>10} {'p90 µs':>8} {'p99 µs':>8}")
    for label, (batch_size, shape) in CASES.items():
        for use_torch in modes:
            samples = bench(batch_size, shape, args.iterations, use_torch)
            cuts = statistics.quantiles(samples, n=100)
            views = "numpy+torch" if use_torch else "numpy"
            print(f"{label:<20} {views:<12} {statistics.median(samples):>10.1f} "
                  f"{cuts[89]:>8.1f} {cuts[98]:>8.1f}")  # fmt: skip
    if modes == [False]:
        print("(torch not installed: torch views not measured)")


if __name__ == "__main__":
    main()
