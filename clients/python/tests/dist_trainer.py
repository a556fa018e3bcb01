"""A torch.distributed (gloo, CPU) trainer rank for test_selection.py:
``python dist_trainer.py RANK WORLD PORT NAME RUNTIME_DIR EPOCHS``.

Attaches to lane 0 of ring NAME (its node's daemon: one lane per node), iterates EPOCHS epochs
and calls ``loader.report`` after every batch: the real all-gather path. Prints one JSON line
per epoch: the ids it was served.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch.distributed as dist

import ringfeed


def main() -> None:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    name, directory, epochs = sys.argv[4], sys.argv[5], int(sys.argv[6])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = ringfeed.Loader(name, 0, runtime_dir=directory, timeout=60, wait_for_producer=30)
    for epoch in range(epochs):
        served: list[int] = []
        for batch in loader:
            ids = batch.sample_ids.copy()
            served.extend(ids.tolist())
            loader.report(ids, ((ids * 7919 + epoch * 104729) % 97) / 97.0 + 0.01)
        print(json.dumps({"rank": rank, "epoch": epoch, "ids": served}), flush=True)
    loader.close()
    dist.barrier()
    dist.destroy_process_group()
    print(json.dumps({"rank": rank, "done": True}), flush=True)


if __name__ == "__main__":
    np.seterr(all="raise")
    main()
