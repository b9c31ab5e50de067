"""The shift-and-add executor (a focused ResNet-20 run from its codes) vs the fp32 model and the fake-quantized one.

    .venv/bin/python benchmarks/bench_shift.py [--batch 8] [--repeats 5]

The shipped ResNet-20, 80% of each layer's weights pruned by magnitude (no fine-tuning: speed does not
depend on it), focused 5-bit weights (the paper's level set) and 8-bit inputs calibrated on 64 seeded
random images in [0, 1]. One forward pass of a batch of ``--batch`` such images per call, in eval mode,
no gradients; variants alternate; ratios are medians of per-round ratios. The executor is a reference
implementation (the codes alone define the network), written with tensor operations: on a CPU it is
expected to be slower than the fp32 convolutions it replaces, and this measures by how much.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

from cpq_lib.quant import calibrate_  # noqa: E402
from cpq_lib.sparse import magnitude_prune_  # noqa: E402
from cpq_lib.sparse.executor import ShiftAddExecutor, quantize_focused_inputs_  # noqa: E402
from cpq_lib.sparse.transform import focus_quantize_  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    float_model = resnet20().eval()
    focused = resnet20().eval()
    magnitude_prune_(focused, 0.8, exclude=("conv1", "fc"))
    focus_quantize_(focused, bits=5)
    quantize_focused_inputs_(focused, bits=8)
    calibrate_(focused, [(torch.rand(64, 3, 32, 32, generator=generator), torch.zeros(64, dtype=torch.long))])
    executor = ShiftAddExecutor(focused)
    x = torch.rand(args.batch, 3, 32, 32, generator=generator)

    def run(model):
        def forward():
            with torch.no_grad():
                model(x)
        return forward

    times = time_alternating({"fp32": run(float_model), "fake-quantized": run(focused), "shift-add": lambda: executor(x)},
                             args.repeats, warmup=1)
    with torch.no_grad():
        reference, ours = focused(x), executor(x)
    result = {"seconds": {name: median(values) for name, values in times.items()},
              "shift_add_vs_fp32": paired_ratio(times, "shift-add", "fp32"),
              "fake_quantized_vs_fp32": paired_ratio(times, "fake-quantized", "fp32"),
              "max_logit_difference": float((ours - reference).abs().max()),
              "same_classes": bool(torch.equal(ours.argmax(1), reference.argmax(1))),
              "focused_layers": len(executor.layers), "batch": args.batch, "repeats": args.repeats, "times": times,
              "machine": machine()}
    save("bench_shift", result)
    print(f"shift-add {result['shift_add_vs_fp32']:.1f}x the fp32 forward, fake-quantized {result['fake_quantized_vs_fp32']:.2f}x "
          f"(batch {args.batch}); logits within {result['max_logit_difference']:.2g} of the fake-quantized model's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
