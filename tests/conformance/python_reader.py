#!/usr/bin/env python3
"""The Python client's conformance reader: the same output as `ringfeed consume --digest` and
clients/c's `read_batches` (one line per batch: ``epoch E index I count C ids SUM images
HASH [redelivered]``, then ``end``; errors as ``error CODE: message`` on stderr, exit 1).

It iterates the way the README tells trainers to: one ``for`` over the loader per epoch,
until an epoch yields nothing. ``--pause-at-epoch-end S`` holds each epoch's last batch S
seconds before it is released (the loader releases it when the next one is asked for) and
waits S seconds more before the next epoch's loop.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import ringfeed

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1


def fnv1a64(data: bytes) -> int:
    h = FNV_OFFSET
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def line(batch: ringfeed.Batch) -> str:
    ids = np.asarray(batch["sample_ids"]).astype(np.int64)
    total = int(ids.astype(np.uint64).sum(dtype=np.uint64))  # wrapping, like the others
    if total >= 1 << 63:
        total -= 1 << 64
    images = np.ascontiguousarray(batch["images"]).view(np.uint8).tobytes()
    tail = " redelivered" if batch.redelivered else ""
    return (
        f"epoch {batch.epoch} index {batch.index} count {batch.count} ids {total}"
        f" images {fnv1a64(images):016x}{tail}"
    )


def code_of(err: ringfeed.RingfeedError) -> str:
    if isinstance(err, ringfeed.AttachError):
        return err.code
    if isinstance(err, ringfeed.ProducerGone):
        return "producer_gone"
    if isinstance(err, ringfeed.RingTimeout):
        return "timeout"
    if isinstance(err, ringfeed.FormatError):
        return "format"
    return "client"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--lane", type=int, default=0)
    parser.add_argument("--wait", type=float, default=0.0)
    parser.add_argument("--hold", type=int)
    parser.add_argument("--resume", metavar="EPOCH:INDEX")
    parser.add_argument("--pause-at-epoch-end", type=float, default=0.0)
    args = parser.parse_args()
    try:
        try:
            loader = ringfeed.Loader(
                args.name, args.lane, wait_for_producer=args.wait,
                release_previous=args.hold is None,
                resume=None
                if args.resume is None
                else dict(zip(("epoch", "index"), map(int, args.resume.split(":")))),
            )  # fmt: skip
        except ringfeed.AttachError as err:
            if err.code == "finished":  # the run this reader would read is over
                print(err, file=sys.stderr)
                print("end", flush=True)
                return 0
            raise
        if args.hold is not None:
            held = []
            while len(held) < args.hold:
                held.append(loader.next_batch())
                print(line(held[-1]), flush=True)
            print("holding", flush=True)
            while True:
                time.sleep(3600)
        while True:
            taken = 0
            for batch in loader:
                taken += 1
                print(line(batch), flush=True)
                if batch.last_of_epoch:
                    time.sleep(args.pause_at_epoch_end)  # held; released at the next step
            if taken == 0:
                break
            time.sleep(args.pause_at_epoch_end)  # before asking for the next epoch
        loader.close()
    except ringfeed.RingfeedError as err:
        print(f"error {code_of(err)}: {err}", file=sys.stderr)
        return 1
    print("end", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
