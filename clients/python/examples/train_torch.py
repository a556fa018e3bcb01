"""Train a small CNN on batches from a running ``ringfeed serve`` (CPU is fine).

    ringfeed serve --name demo --batch-size 32 --epochs 0 &
    python examples/train_torch.py --name demo --steps 20

Under torchrun each rank reads its own lane (``LOCAL_RANK``).
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
    parser.add_argument("--name", required=True, help="ring name given to ringfeed serve")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--lane", type=int, default=None, help="default: $LOCAL_RANK or 0")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = ringfeed.Loader(args.name, args.lane, pin=device.type == "cuda", wait_for_producer=30)
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
            f"waited for data {100 * stats['wait_share']:.1f} % of the time; "
            f"resume with {loader.state_dict()}"
        )


if __name__ == "__main__":
    main()
