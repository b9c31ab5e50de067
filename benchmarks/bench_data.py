"""Training throughput: real CIFAR-10 batches (decoded tensors + on-tensor augmentation) vs random data.

    .venv/bin/python benchmarks/bench_data.py --data-root ../shared/data/cifar10-jpeg.zip [--steps 20 --repeats 5]

Both variants run the same ResNet-20 training step (batch 128, channels_last, SGD); the only
difference is where the batch comes from. Blocks of ``--steps`` steps alternate; the reported ratio is
the median over rounds of the per-round images/s ratio (1.0 means data loading costs nothing).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, save, time_alternating  # noqa: E402

from cpq_lib.data import load_dataset  # noqa: E402
from cpq_lib.models import build_model  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    data = load_dataset("cifar10", args.data_root)
    torch.manual_seed(0)
    model = build_model("resnet20", 10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(images, labels):
        loss = loss_fn(model(images.contiguous(memory_format=torch.channels_last)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    loader = data.train_loader(args.batch, seed=0)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    fixed = (torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))

    def real():
        for _ in range(args.steps):
            step(*next(batches))

    def random():
        for _ in range(args.steps):
            step(*fixed)

    times = time_alternating({"random data": random, "cifar10 loader": real}, args.repeats, warmup=1)
    per_second = {k: args.steps * args.batch / median(v) for k, v in times.items()}
    ratio = paired_ratio(times, "random data", "cifar10 loader")  # time ratio inverted = images/s ratio
    save("bench_data", {"images_per_second": per_second, "ratio": ratio, "steps": args.steps,
                        "repeats": args.repeats, "batch": args.batch, "machine": machine()})
    print(f"training images/s: random data {per_second['random data']:.0f}, CIFAR-10 loader "
          f"{per_second['cifar10 loader']:.0f}, ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
