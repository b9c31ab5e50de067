"""Batched class scoring vs (a) one training pass and (b) the per-image reference loop, on ResNet-20.

    .venv/bin/python benchmarks/bench_scoring.py --data-root ../shared/data/cifar10-jpeg.zip [--repeats 3]

Images: 100 training images of each of the 10 classes (1,000), batch 250, channels_last throughout.
(a) training pass: model in eval mode, forward + cross-entropy backward through all parameters, no
optimizer step. (b) the reference procedure, one image per forward and backward, over the same 1,000
images; like the batched scorer it computes activation gradients only (no weight gradients). Both
scorers use the default (reference) aggregation; their scores on all images are checked to be equal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.classpath import score_classes  # noqa: E402
from cpq_lib.classpath.reference import score_classes_per_image  # noqa: E402
from cpq_lib.data import load_dataset  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=100)
    args = parser.parse_args(argv)
    data = load_dataset("cifar10", args.data_root)
    model = resnet20()
    model = model.to(memory_format=torch.channels_last).eval()
    loader = data.per_class_loader(args.per_class, split="train", seed=0, batch_size=250)
    images, labels = (torch.cat(parts) for parts in zip(*loader))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # every batch mixes all classes
    batches = [(images[i].contiguous(memory_format=torch.channels_last), labels[i]) for i in order.split(250)]

    # Variants alternate batch by batch (this machine's speed drifts over seconds of load), so each
    # repeat times every batch once per variant; a repeat's time is the sum over its batches.
    def scoring(batch):
        score_classes(model, [batch], 10, data.classes, progress=False)

    def training_pass(batch):
        images, labels = batch
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        model.zero_grad(set_to_none=True)

    def per_image(batch):
        score_classes_per_image(model, [batch], 10, data.classes)

    variants = {"training pass": training_pass, "batched scoring": scoring, "per-image loop": per_image}
    for fn in variants.values():  # warm-up (compiles the fused kernels once)
        fn(batches[0])
    totals: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        round_times = {name: 0.0 for name in variants}
        for batch in batches:
            runs = {name: (lambda fn=fn, batch=batch: fn(batch)) for name, fn in variants.items()}
            for name, value in time_alternating(runs, repeats=1, warmup=0).items():
                round_times[name] += value[0]
        for name, value in round_times.items():
            totals[name].append(value)
    seconds = {k: median(v) for k, v in totals.items()}
    total_images = sum(len(y) for _, y in batches)
    # same scores: the batched scorer against the reference on all the timed images
    batched = score_classes(model, batches, 10, data.classes, progress=False)
    reference = score_classes_per_image(model, batches, 10, data.classes)
    same = all(torch.equal(batched.scores[n], reference.scores[n]) for n in batched.layers)
    result = {"images": total_images, "seconds": seconds, "same_scores": same,
              "aggregate": batched.settings["aggregate"],
              "scoring_vs_training_pass": paired_ratio(totals, "batched scoring", "training pass"),
              "per_image_vs_scoring": paired_ratio(totals, "per-image loop", "batched scoring"),
              "repeats": args.repeats, "machine": machine()}
    save("bench_scoring", result)
    print(f"{total_images} images: training pass {seconds['training pass']:.2f} s, batched scoring "
          f"{seconds['batched scoring']:.2f} s, per-image loop {seconds['per-image loop']:.1f} s")
    print(f"batched scoring / training pass = {result['scoring_vs_training_pass']:.3f}; "
          f"per-image loop / batched scoring = {result['per_image_vs_scoring']:.1f}x; same scores: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
