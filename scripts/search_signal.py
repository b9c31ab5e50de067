"""How well a search's accuracy predicts the refined accuracy: committed plans re-measured per setting.

    .venv/bin/python scripts/search_signal.py --data-root ../shared/data/cifar10-jpeg.zip \
        --records results/cifar10/records-v1 results/cifar10/gpu-h100-refine15/records \
        --out results/cifar10/search_signal.json

Every committed record's plan is evaluated the way a search evaluates it (``SearchEvaluator``: the
record's seed picks the calibration, BatchNorm and validation images), under each setting: 1,000
validation images with the stale BatchNorm statistics (the reference), 1,000 and 2,000 images with
BatchNorm re-estimated on 512 training images. Per target (plans of one budget, which a search
compares) and setting: Spearman's rank correlation between that accuracy and the record's validation
accuracy after refinement, and the seconds per evaluation. Validation data only; the test split is
not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from scipy import stats

SETTINGS = {"1000 images, stale BN": (1000, 0), "1000 images, BN re-estimated": (1000, 512),
            "2000 images, BN re-estimated": (2000, 512)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--records", nargs="+", required=True, help="folders of record JSON files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from cpq_lib.allocation import SearchEvaluator
    from cpq_lib.config import from_dict, ExperimentConfig
    from cpq_lib.experiment import quantized_student
    from cpq_lib.fileio import atomic_write_json
    from cpq_lib.pipeline import baseline_model, load_data
    from cpq_lib.quant import BitPlan
    from cpq_lib.runtime import configure_for

    records = []
    for folder in args.records:
        for path in sorted(Path(folder).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            if "results" in record and "key" not in path.name:
                records.append((f"{Path(folder).name}/{path.stem}", record))
    if not records:
        print("error: no records found", file=sys.stderr)
        return 2
    first = records[0][1]["config"]
    settings_dict = {k: v for k, v in first.items() if k in {f for f in ExperimentConfig.__dataclass_fields__}}
    settings_dict["data"] = {**settings_dict["data"], "root": args.data_root}
    settings_dict["allocation"] = {k: v for k, v in settings_dict["allocation"].items() if k not in ("t1", "r", "similarity", "fill")}
    base = from_dict(ExperimentConfig, settings_dict)
    configure_for(base)
    data = load_data(base)
    search = data.for_search()
    import tempfile

    teacher, _ = baseline_model(base, data, Path(tempfile.mkdtemp()), progress=False)
    rows = []
    students = {}
    for name, record in records:
        config = record["config"]
        key = (config["allocation"]["act_bits"], config["seed"])
        if key not in students:
            cfg = from_dict(ExperimentConfig, {**settings_dict, "seed": config["seed"],
                                               "allocation": {**settings_dict["allocation"], "act_bits": key[0]}})
            students[key] = quantized_student(teacher, cfg, search, "cpu")
        plan = BitPlan.from_dict(record["results"]["plan"])
        row = {"record": name, "target": record["results"]["target"]["label"], "allocator": record["results"]["allocator"],
               "seed": config["seed"], "refine_epochs": record["results"]["refinement"]["epochs"],
               "val_after": record["results"]["after_refinement"]["val_accuracy"]}
        for label, (images, bn) in SETTINGS.items():
            evaluator = SearchEvaluator(students[key], search, images, seed=config["seed"], bn_images=bn)
            bits = evaluator.space.from_plan(plan)
            started = time.perf_counter()
            row[label] = evaluator.evaluate(bits).accuracy
            row[f"{label} seconds"] = time.perf_counter() - started
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = []
    for group in sorted({(r["target"], r["refine_epochs"]) for r in rows}):
        part = [r for r in rows if (r["target"], r["refine_epochs"]) == group]
        for label in SETTINGS:
            rho = stats.spearmanr([r[label] for r in part], [r["val_after"] for r in part]).statistic if len(part) > 2 else None
            summary.append({"target": group[0], "refine_epochs": group[1], "plans": len(part), "setting": label,
                            "spearman_vs_val_after": None if rho is None else round(float(rho), 3),
                            "seconds_per_evaluation": round(sum(r[f"{label} seconds"] for r in part) / len(part), 2)})
    atomic_write_json({"command": "python " + " ".join(["scripts/search_signal.py", *sys.argv[1:]]), "rows": rows,
                       "summary": summary}, args.out)
    print("| target | refine epochs | plans | setting | Spearman vs val after | s / evaluation |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['target']} | {s['refine_epochs']} | {s['plans']} | {s['setting']} | {s['spearman_vs_val_after']} "
              f"| {s['seconds_per_evaluation']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
