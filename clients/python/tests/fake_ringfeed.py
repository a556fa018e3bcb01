#!/usr/bin/env python3
"""A stand-in for ``ringfeed serve`` built on the reference producer, to exercise
test_daemon.py's harness before the real daemon exists:

    RINGFEED_BIN=tests/fake_ringfeed.py pytest tests/test_daemon.py

It mimics the CLI flags and serves a 96-sample "dataset" of synthetic batches.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ring_writer import RingWriter

SAMPLES = 96


def main() -> int:
    parser = argparse.ArgumentParser(prog="ringfeed")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    serve.add_argument("--name", required=True)
    serve.add_argument("--config")
    serve.add_argument("--lanes", type=int, default=1)
    serve.add_argument("--batch-size", type=int, default=8)
    serve.add_argument("--epochs", type=int, default=1)
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--slots-per-lane", type=int, default=4)
    args = parser.parse_args()
    runtime = os.environ.get("RINGFEED_RUNTIME_DIR") or f"/tmp/ringfeed-{os.getuid()}"
    writer = RingWriter(
        args.name,
        runtime,
        lanes=args.lanes,
        slots=args.slots_per_lane,
        batch_size=args.batch_size,
        batches_per_epoch=SAMPLES // (args.batch_size * args.lanes),
        epochs=args.epochs,
        seed=args.seed,
    )
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    writer.serve()
    writer.start_producing()
    print(f"ringfeed (fake) serving {args.name!r} in {runtime}", file=sys.stderr, flush=True)
    stopped.wait()
    writer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
