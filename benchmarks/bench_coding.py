"""Lossless coders on focused-quantization codes of the shipped ResNet-20: throughput and size vs entropy.

    .venv/bin/python benchmarks/bench_coding.py [--repeats 5] [--sparsity 0.8] [--bits 5]

The shipped ResNet-20 (no data needed) is pruned to ``--sparsity`` per layer (magnitude, one shot)
and focused-quantized at ``--bits``; every quantized layer's sparsity gaps and codes are coded and
decoded with Huffman, ANS and zstd. Reported per coder: encode and decode throughput in weights per
second (all weights of the coded layers, pruned ones included, over the time for all layers), the
ratio of each to zstd's (timed alternately in one process, median of per-round ratios), and the
coded payload and tables against the streams' empirical entropy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, resnet20, save, time_alternating  # noqa: E402

import numpy as np  # noqa: E402

from cpq_lib.sparse import CODERS, decode, empirical_entropy_bits, encode, magnitude_prune_, positions_from_gaps, relative_indices  # noqa: E402
from cpq_lib.sparse.transform import focus_quantize_, focused_codes  # noqa: E402


def streams(sparsity: float, bits: int) -> tuple[list[np.ndarray], int]:
    model = resnet20()
    magnitude_prune_(model, sparsity, exclude=("conv1", "fc", "*shortcut*"))
    focus_quantize_(model, bits, exclude=("@first", "@last", "*shortcut*"))
    out, weights = [], 0
    for codes, _ in focused_codes(model).values():
        flat = codes.flatten().numpy().astype(np.int64)
        gaps, _ = relative_indices(flat >= 0, 255)
        out += [gaps, flat[positions_from_gaps(gaps)]]
        weights += flat.size
    return out, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--bits", type=int, default=5)
    args = parser.parse_args(argv)
    data, weights = streams(args.sparsity, args.bits)
    coded = {coder: [encode(s, coder) for s in data] for coder in CODERS}
    exact = all(np.array_equal(decode(c), s) for coder in CODERS for c, s in zip(coded[coder], data))
    entropy = sum(empirical_entropy_bits(s) for s in data)
    encoders = {f"encode {c}": (lambda c=c: [encode(s, c) for s in data]) for c in CODERS}
    decoders = {f"decode {c}": (lambda c=c: [decode(x) for x in coded[c]]) for c in CODERS}
    times = time_alternating({**encoders, **decoders}, args.repeats, warmup=1)
    seconds = {name: median(values) for name, values in times.items()}
    result = {"weights": weights, "symbols": int(sum(len(s) for s in data)), "entropy_bits": entropy, "exact_round_trip": exact,
              "coders": {c: {"encode_weights_per_s": weights / seconds[f"encode {c}"],
                             "decode_weights_per_s": weights / seconds[f"decode {c}"],
                             "encode_vs_zstd": paired_ratio(times, f"encode {c}", "encode zstd"),
                             "decode_vs_zstd": paired_ratio(times, f"decode {c}", "decode zstd"),
                             "payload_bits": sum(x.payload_bits for x in coded[c]), "table_bits": sum(x.table_bits for x in coded[c]),
                             "payload_over_entropy": sum(x.payload_bits for x in coded[c]) / entropy,
                             "total_over_entropy": sum(x.bits for x in coded[c]) / entropy} for c in CODERS},
              "sparsity": args.sparsity, "bits": args.bits, "repeats": args.repeats, "times": times, "machine": machine()}
    save("bench_coding", result)
    for coder, row in result["coders"].items():
        print(f"{coder:8s} encode {row['encode_weights_per_s'] / 1e6:7.2f} M weights/s ({row['encode_vs_zstd']:.2f}x zstd's time), "
              f"decode {row['decode_weights_per_s'] / 1e6:7.2f} M weights/s ({row['decode_vs_zstd']:.2f}x), "
              f"payload/entropy {row['payload_over_entropy']:.4f}, with tables {row['total_over_entropy']:.4f}")
    print(f"exact round trip: {exact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
