"""ONNX Runtime latency of exported quantized models against the fp32 export of the same network.

    .venv/bin/python benchmarks/bench_onnx.py [--repeats 20] [--batch 64] [--threads 1]

The shipped ResNet-20 (CIFAR-10 shapes, random images: latency does not depend on the data), exported
by ``torch.onnx.export`` as fp32 and by ``cpq_lib.quant.onnx_export`` as W8A8 and as a mixed
per-channel plan (2..6 bits, some channels pruned, 4-bit activations). ONNX Runtime's CPU provider
with its graph optimizations on (deployment mode: QDQ pairs may be fused into integer kernels) and
off. Variants alternate within each round; ratios are medians of per-round ratios to fp32. QDQ
graphs can be slower than fp32 on a CPU: the record says what it is on this one.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, save, time_alternating  # noqa: E402


def _mixed_plan(model, seed: int = 0):
    from cpq_lib.quant import BitPlan

    plan = BitPlan.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    for bits in plan.layers.values():
        bits.weight = torch.tensor([0, 2, 3, 4, 5, 6])[torch.randint(0, 6, (len(bits.weight),), generator=generator)].tolist()
    return plan


def build(folder: Path, batch: int) -> dict[str, Path]:
    from cpq_lib.models import load_pretrained
    from cpq_lib.quant import QuantConfig, calibrate_, quantize_
    from cpq_lib.quant.onnx_export import export_onnx

    model, _ = load_pretrained("resnet20", "cifar10")
    model = model.float().eval()
    example = torch.rand(batch, 3, 32, 32)
    calibration = [(torch.rand(64, 3, 32, 32), None)]
    paths = {"fp32": folder / "fp32.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(paths["fp32"]), dynamo=True, opset_version=21, external_data=False,
                          input_names=["input"], output_names=["logits"], verbose=False)
    w8a8 = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=8))
    calibrate_(w8a8, calibration)
    paths["W8A8"] = export_onnx(w8a8.eval(), example, folder / "w8a8.onnx")
    mixed = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=4))
    _mixed_plan(mixed).apply_(mixed)
    calibrate_(mixed, calibration)
    paths["mixed 0-6 bits, A4"] = export_onnx(mixed.eval(), example, folder / "mixed.onnx")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import onnxruntime as ort

    torch.set_default_dtype(torch.float32)
    images = torch.rand(args.batch, 3, 32, 32).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.batch)
        variants = {}
        for optimize in (True, False):
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                                else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            for name, path in paths.items():
                label = f"{name} ({'optimized' if optimize else 'unoptimized'})"
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                variants[label] = (lambda s=session: s.run(None, {"input": images}))
        times = time_alternating(variants, args.repeats)
    ratios = {}
    for mode in ("optimized", "unoptimized"):
        baseline = f"fp32 ({mode})"
        ratios.update({name: paired_ratio(times, name, baseline) for name in times if name.endswith(f"({mode})") and name != baseline})
    record = {"benchmark": "ONNX Runtime latency: cpq QDQ exports vs fp32 export, ResNet-20", "batch": args.batch,
              "repeats": args.repeats, "ort_threads": args.threads, "onnxruntime": ort.__version__, "machine": machine(),
              "median_ms": {k: round(1000 * median(v), 3) for k, v in times.items()},
              "ratio_to_fp32": {k: round(v, 3) for k, v in ratios.items()}, "seconds": times}
    path = save("bench_onnx", record)
    print({"median_ms": record["median_ms"], "ratio_to_fp32": record["ratio_to_fp32"]})
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
