"""Peak memory of class scoring + a ClassPathQ search + one refinement epoch, as the data set grows 10x:
read lazily through a Dataset (the ``imagenet`` data set) against decoded into memory (``imagefolder``).

    .venv/bin/python benchmarks/bench_memory.py [--images 6000 60000 --image-size 64]

For each size a generated folder of one image size (``cpq_lib.data.synthetic``; one size, so that the
in-memory reader takes it too) is written once; each (path, size) then runs in a fresh process
(``run_experiment``: baseline training for one epoch, class scores, the search, one refinement epoch,
the final report), which reports its peak resident set size (``ru_maxrss``). Memory, unlike time, does
not depend on what else runs on the machine; the stages' settings are the same for every size, so only
the data set's size differs. The smallest size must fill every batch of every stage (evaluation
batches of 500: the validation split of 6,000 images has 500), or the larger set's peak grows by its
fuller batches' activations rather than by its data. The record and a figure go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import machine, save  # noqa: E402

PATHS = {"lazy": "read lazily (Dataset)", "memory": "decoded in memory"}
STAGES = {"model.name": "digits_cnn", "model.pretrained": False, "train.epochs": 1, "train.batch_size": 64,
          "allocation.method": "classpath", "allocation.weight_bits": 3, "allocation.act_bits": 4, "allocation.start_bits": 4,
          "allocation.images_per_class": 8, "allocation.search_images": 200, "allocation.bn_images": 64,
          "allocation.calibration_images": 64, "allocation.sparsities": [0.5], "refine.epochs": 1, "refine.batch_size": 64,
          "device": "cpu", "dtype": "float32", "deterministic": False}


def child(path: str, root: str, image_size: int, out: str, method: str) -> int:
    """One measured process: every stage of an experiment on ``root``, then its peak resident memory."""
    from cpq_lib.config import make_config
    from cpq_lib.experiment import run_experiment

    data = ({"data.name": "imagenet", "data.image_size": image_size} if path == "lazy" else {"data.name": "imagefolder"})
    config = make_config("quick", {**STAGES, "allocation.method": method, "data.root": root, "data.val_fraction": 0.1, **data})
    record = run_experiment(config, out, progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "seconds": record["results"]["seconds"],
                      "evaluations": record["results"]["search"]["cost"]["evaluations"]}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[6000, 60000], help="images per data set (train + test)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--method", default="classpath", help="the allocator searched (memory: one of the stages)")
    parser.add_argument("--child", nargs=5, metavar=("PATH", "ROOT", "SIZE", "OUT", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], args.child[1], int(args.child[2]), args.child[3], args.child[4])
    import pandas as pd

    from cpq_lib.data.synthetic import write_image_folder
    from cpq_lib.plots import memory_vs_size, save_figure

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        env = {**os.environ, "CPQ_CACHE_DIR": str(Path(scratch) / "cache")}  # the in-memory reader's decoded copy
        for images in args.images:
            per_class = images // 10
            root = write_image_folder(Path(scratch) / f"folder-{images}", classes=10, per_class=per_class * 5 // 6,
                                      test_per_class=per_class - per_class * 5 // 6, sizes=(args.image_size,) * 2,
                                      test_folder="test")
            for path, label in PATHS.items():
                out = Path(scratch) / f"run-{path}-{images}"
                done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", path, str(root),
                                       str(args.image_size), str(out), args.method], capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                measured = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"path": label, "images": images, **measured})
                print(f"{label}, {images} images: peak {measured['peak_rss_mb']:.0f} MB ({measured['seconds']:.0f} s)")
    frame = pd.DataFrame(rows)
    small, large = min(args.images), max(args.images)
    growth = {label: float(frame[(frame.path == label) & (frame.images == large)].peak_rss_mb.iloc[0]
                           / frame[(frame.path == label) & (frame.images == small)].peak_rss_mb.iloc[0]) for label in PATHS.values()}
    save("bench_memory", {"rows": rows, "growth": growth, "images": args.images, "image_size": args.image_size,
                          "stages": {**STAGES, "allocation.method": args.method}, "machine": machine()})
    save_figure(memory_vs_size(frame), common.RESULTS, "bench_memory", formats=("png",))
    for label, ratio in growth.items():
        print(f"{label}: peak memory x{ratio:.2f} when the data set grows x{large / small:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
