"""GPU speed of training and of QAT + KD refinement: cpq's trainer epoch vs a pure-step epoch.

    python benchmarks/bench_gpu.py [--data-root ../shared/data/cifar10-jpeg.zip] [--batches 128 512]
                                   [--epochs 3] [--repeats 3]

Tasks: fp32 training of ResNet-20, and quantization-aware refinement with knowledge distillation (4-bit
weights and activations, learnable scales, the fp32 model as teacher, alpha 0.3, T 4). For each task and
batch size three variants run whole epochs over the same images (45,000, channels_last):

- ``pure``: batches already on the GPU as float tensors (augmented once, beforehand); forward, loss,
  backward and SGD in plain eager PyTorch; nothing else. The floor for eager code.
- ``trainer``: ``cpq_lib.train.train_model`` with ``train.compile=off``: batches made and augmented on
  the GPU each epoch, device-side sums, the validation pass after every epoch (5,000 images) included.
- ``trainer_compiled``: the same with ``train.compile=on`` (CUDA graphs, ``reduce-overhead``).

Variants alternate in rounds; in each round every variant runs ``--epochs`` epochs in one call and its
first epoch (warm-up, compilation) is dropped; the round's value is the median of the others, ratios
are medians over rounds of the per-round ratio. Goals (checked and recorded): the eager trainer within
10% of ``pure``; the compiled trainer below it; 400 fp32 epochs (batch 128) under 10 minutes; a QAT+KD
epoch at most 2x an fp32 epoch (same batch, compiled trainer).

Without a CUDA device the script says so and exits 0; ``--device cpu --limit N`` runs the same code on
N images on the CPU (a smoke test of the script, not a measurement; add ``--no-save``).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, resnet20, save  # noqa: E402

from cpq_lib.config import RefineConfig, TrainConfig  # noqa: E402
from cpq_lib.data import Augment, DataBundle, ImageTensors, load_dataset  # noqa: E402
from cpq_lib.quant import QuantConfig, calibrate_, quantize_  # noqa: E402
from cpq_lib.train import Distillation, train_model  # noqa: E402

VARIANTS = ("pure", "trainer", "trainer_compiled")
GOALS = {"trainer_vs_pure": 1.10, "trainer_compiled_vs_pure": 1.0, "fp32_400_epochs_s": 600.0, "qat_vs_fp32": 2.0}


def synthetic(train: int, val: int) -> DataBundle:
    """Random CIFAR-shaped images: speed does not depend on pixel values."""
    generator = torch.Generator().manual_seed(0)

    def part(n: int) -> ImageTensors:
        return ImageTensors(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
                            torch.randint(0, 10, (n,), generator=generator))

    return DataBundle(name="synthetic", classes=[str(i) for i in range(10)], train=part(train), val=part(val),
                      test=part(val), split_seed=0, val_fraction=0.1, augment=Augment(pad=4, flip=True))


def limited(data: DataBundle, limit: int | None) -> DataBundle:
    if limit is None:
        return data
    return DataBundle(name=data.name, classes=data.classes, train=data.train.subset(range(min(limit, len(data.train)))),
                      val=data.val.subset(range(min(max(1, limit // 10), len(data.val)))), test=data.test,
                      split_seed=data.split_seed, val_fraction=data.val_fraction, augment=data.augment,
                      val_digest=data.val_digest)


def student_of(teacher: torch.nn.Module, data: DataBundle, device: str) -> torch.nn.Module:
    student = quantize_(copy.deepcopy(teacher), QuantConfig(weight_bits=4, act_bits=4, learnable_scales=True))
    return calibrate_(student.to(device).eval(), data.calibration_loader(256), device)


def pure_epoch(task: str, model, teacher, batches, optimizer) -> None:
    model.train()
    for images, labels in batches:
        if task == "fp32":
            loss = F.cross_entropy(model(images), labels)
        else:
            with torch.no_grad():
                soft = teacher(images)
            logits = model(images)
            loss = 0.3 * F.cross_entropy(logits, labels) + 0.7 * 16.0 * F.kl_div(
                F.log_softmax(logits / 4.0, 1), F.log_softmax(soft / 4.0, 1), reduction="batchmean", log_target=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if torch.device(images.device).type == "cuda":
        torch.cuda.synchronize()


def epoch_times(run_epochs, epochs: int) -> list[float]:
    """Seconds of each epoch after the first (warm-up, compilation)."""
    stamps = [time.perf_counter()]
    run_epochs(lambda _record=None: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:])] if len(stamps) > 2 else []


def measure(task: str, batch: int, data: DataBundle, fp32: torch.nn.Module, device: str, epochs: int,
            repeats: int) -> dict:
    fmt = torch.channels_last
    teacher = fp32.to(device).eval().to(memory_format=fmt)
    make = (lambda: copy.deepcopy(fp32).to(device)) if task == "fp32" else (lambda: student_of(fp32, data, device))
    models = {name: make().to(memory_format=fmt) for name in VARIANTS}
    loader = data.train_loader(batch, seed=0, device=device)
    batches = [(x.contiguous(memory_format=fmt), y) for x, y in loader]  # "already on the GPU"
    pure_optimizer = torch.optim.SGD(models["pure"].parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    settings = dict(epochs=epochs, batch_size=batch, lr=0.01, schedule="cosine", channels_last=True)

    def trainer(name: str, compile_setting: str):
        cfg = (TrainConfig if task == "fp32" else RefineConfig)(**settings, compile=compile_setting)
        objective = None if task == "fp32" else Distillation(teacher, 0.3, 4.0)

        def run(tick):
            train_model(models[name], data, cfg, seed=0, device=device, progress=False, objective=objective,
                        on_epoch=tick)
        return run

    def pure(tick):
        for _ in range(epochs):
            pure_epoch(task, models["pure"], teacher, batches, pure_optimizer)
            tick()

    runs = {"pure": pure, "trainer": trainer("trainer", "off"), "trainer_compiled": trainer("trainer_compiled", "on")}
    rounds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for index in range(repeats):
        for name in (VARIANTS if index % 2 == 0 else VARIANTS[::-1]):
            rounds[name].append(statistics.median(epoch_times(runs[name], epochs)))
    ratio = {f"{name}_vs_pure": statistics.median(v / p for v, p in zip(rounds[name], rounds["pure"]))
             for name in VARIANTS[1:]}
    return {"task": task, "batch": batch, "epoch_seconds": {k: statistics.median(v) for k, v in rounds.items()},
            "rounds": rounds, **ratio}


def goals(rows: list[dict]) -> dict:
    found = {}
    for row in rows:
        for key in ("trainer_vs_pure", "trainer_compiled_vs_pure"):
            limit = GOALS[key]
            met = row[key] <= limit if key == "trainer_vs_pure" else row[key] < limit
            found[f"{row['task']} b{row['batch']} {key}"] = {"value": round(row[key], 3), "goal": limit, "met": met}
    by = {(r["task"], r["batch"]): r["epoch_seconds"] for r in rows}
    if ("fp32", 128) in by:
        best = min(by[("fp32", 128)]["trainer"], by[("fp32", 128)]["trainer_compiled"])
        found["fp32 b128 400 epochs (s)"] = {"value": round(400 * best, 1), "goal": GOALS["fp32_400_epochs_s"],
                                            "met": 400 * best < GOALS["fp32_400_epochs_s"]}
    for (task, batch), seconds in by.items():
        if task == "qat_kd" and ("fp32", batch) in by:
            value = seconds["trainer_compiled"] / by[("fp32", batch)]["trainer_compiled"]
            found[f"qat_kd vs fp32 b{batch} (compiled trainer)"] = {"value": round(value, 3), "goal": GOALS["qat_vs_fp32"],
                                                                    "met": value <= GOALS["qat_vs_fp32"]}
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="CIFAR-10 (zip or folder); default: random CIFAR-shaped images")
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tasks", nargs="+", default=["fp32", "qat_kd"], choices=["fp32", "qat_kd"])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per variant and round (the first is dropped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=int, default=None, help="use only this many training images (smoke tests)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device on this machine; it measures GPU speed, so nothing was measured "
              "(run it on a GPU; --device cpu --limit N is a smoke test of the script)")
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch of each call is warm-up)")
    data = limited(load_dataset("cifar10", args.data_root) if args.data_root else synthetic(45_000, 5_000), args.limit)
    fp32 = resnet20().float()
    rows = [measure(task, batch, data, fp32, args.device, args.epochs, args.repeats)
            for task in args.tasks for batch in args.batches]
    met = goals(rows)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke test)"
    for row in rows:
        seconds = ", ".join(f"{k} {v:.2f} s" for k, v in row["epoch_seconds"].items())
        print(f"{row['task']:>6} batch {row['batch']:>4}: {seconds}; trainer/pure {row['trainer_vs_pure']:.3f}, "
              f"compiled/pure {row['trainer_compiled_vs_pure']:.3f}")
    for name, goal in met.items():
        print(f"goal {name}: {goal['value']} (goal {goal['goal']}) {'met' if goal['met'] else 'NOT met'}")
    if not args.no_save:
        path = save("bench_gpu", {"device": where, "data": data.name, "train_images": len(data.train),
                                  "epochs": args.epochs, "repeats": args.repeats, "rows": rows, "goals": met,
                                  "machine": {**machine(), "gpu": where}})
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
