"""Train a small CNN on batches that a daemon started from this script serves (CPU is fine).

    python examples/train_torch.py --steps 20                  # the bundled sample
    python examples/train_torch.py --config my.toml --shards '/data/train-{000000..000127}.tar'
    torchrun --nproc-per-node 2 examples/train_torch.py        # one daemon, a lane per rank

``ringfeed.serve()`` starts ``ringfeed serve`` (local rank 0 only under torchrun), waits until
it serves and stops it when the ``with`` block ends; the daemon also stops by itself if this
process dies. ``--name NAME`` reads a daemon started by hand instead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import ringfeed


def small_cnn(channels: int, classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--name", help="read this running daemon instead of starting one")
    parser.add_argument("--config", help="TOML configuration (default: the bundled sample)")
    parser.add_argument("--shards", help="tar shards (paths, globs, brace ranges)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--lane", type=int, default=None, help="default: $LOCAL_RANK or 0")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.name is not None:  # a daemon started by hand
        pin = device.type == "cuda"
        train(ringfeed.Loader(args.name, args.lane, pin=pin, wait_for_producer=30), device, args)
        return
    with ringfeed.serve(args.config, shards=args.shards) as daemon:
        train(daemon.loader(lane=args.lane, pin=device.type == "cuda"), device, args)


def train(loader: ringfeed.Loader, device: torch.device, args: argparse.Namespace) -> None:
    layout = loader.layout
    images_spec = next(t for t in layout.tensors if t.name == "images")
    channels = images_spec.shape[3] if layout.nhwc else images_spec.shape[1]
    model = small_cnn(channels, args.classes).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    step, started = 0, time.monotonic()
    with loader:
        while step < args.steps:
            steps_before = step
            for batch in loader:
                # Copies on the device (a DMA from the ring when pinned); the slot goes back to
                # the daemon only once the copy is done. normalize=True turns a u8 ring's pixels
                # into the normalised floats on the device (a float ring is left as it is).
                x, y = batch.to(device, normalize=True)
                if layout.nhwc:
                    x = x.permute(0, 3, 1, 2)
                loss = loss_fn(model(x), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                step += 1
                print(f"epoch {batch.epoch} batch {batch.index} step {step} loss {loss.item():.4f}")
                if step == args.steps:
                    break
            if step == steps_before:
                break  # an empty epoch: the producer has served its last one
        stats = loader.stats()
        print(
            f"{step} steps in {time.monotonic() - started:.1f} s; "
            f"waited for data {100 * stats.wait_share:.1f} % of the time; "
            f"resume with {loader.state_dict()}"
        )


if __name__ == "__main__":
    main()
