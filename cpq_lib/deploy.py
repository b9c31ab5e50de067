"""``python -m cpq_lib.deploy``: export a quantized model as ONNX and check it in ONNX Runtime.

Three sources, one of them::

    python -m cpq_lib.deploy --run runs/sweep/runs/classpath-W2-A2-s0 --out model.onnx      # a finished experiment
    python -m cpq_lib.deploy --profile cifar10 --data-root ../shared/data/cifar10-jpeg.zip --bits W4A4 --out m.onnx
    python -m cpq_lib.deploy --profile cifar10 --data-root ... --plan record.json --out m.onnx  # a plan on the baseline

``--run`` exports the experiment's refined student (its last refinement state; before refinement with
``--before-refinement``). ``--bits`` and ``--plan`` quantize the profile's baseline (the shipped model,
or the cached one: none is trained from scratch here) as the experiments do (MSE-searched per-channel scales, activation
clips calibrated on training images). With ``--verify SPLIT`` the graph runs in ONNX Runtime beside
cpq's model on that split, with graph optimizations off and on, and ``<out>.verify.json`` records
top-1 agreement, logit differences and both accuracies.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .cli import check_output_file, fail, integer_at_least, parse_overrides
from .config import PROFILES, ExperimentConfig, from_dict, make_config
from .experiment import BEFORE, RECORD, REFINE_STATE, quantized_student, read_record
from .fileio import atomic_write_json
from .models import build_model
from .pipeline import baseline_folder, baseline_model, load_data, model_kwargs
from .provenance import run_record
from .quant import BitPlan
from .quant.onnx_export import export_onnx, verify_onnx
from .runtime import configure_for


def _student(float_model: nn.Module, config: ExperimentConfig, data, device: str) -> nn.Module:
    return quantized_student(float_model, config, data.for_search(), device).eval()


def parse_bits(text: str) -> tuple[int, int]:
    """'W4A4' -> (4, 4)."""
    from .ptq.study import parse_target

    weight, act = parse_target(text)
    if act is None:
        raise ValueError(f"--bits {text!r}: give activation bits too (e.g. W4A8); ONNX export quantizes both")
    return weight, act


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a finished experiment's run folder (holds record.json)")
    source.add_argument("--bits", help="uniform bits on the profile's baseline, e.g. W4A4")
    source.add_argument("--plan", help="a BitPlan JSON or an experiment record.json, applied to the profile's baseline")
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--run-dir", default=None, help="where the profile's cached baseline is (default runs/<profile>)")
    parser.add_argument("--before-refinement", action="store_true", help="with --run: the student before refinement")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--verify", choices=("train", "val", "test"), default=None,
                        help="run ONNX Runtime beside cpq on this split and write <out>.verify.json")
    parser.add_argument("--verify-images", type=integer_at_least(1), default=None, help="at most this many images")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:  # everything is checked before data or models are loaded
        out = check_output_file(args.out)
        if args.run:
            run = Path(args.run)
            record = read_record(run / RECORD)
            saved = copy.deepcopy(record["config"])
            if args.data_root:
                saved["data"]["root"] = args.data_root
            config = from_dict(ExperimentConfig, saved)
            state_file = run / (BEFORE if args.before_refinement or not (run / REFINE_STATE).is_file() else REFINE_STATE)
            if not state_file.is_file():
                raise ValueError(f"{run} has no {state_file.name}: the run folder is incomplete")
            plan = None
        else:
            overrides = parse_overrides(args.set)
            if args.data_root:
                overrides["data.root"] = args.data_root
            if args.bits:
                weight_bits, act_bits = parse_bits(args.bits)
                plan = None
            else:
                plan, act_bits = _read_plan(Path(args.plan))
                weight_bits = None
            config = make_config(args.profile, {**overrides, "allocation.act_bits": act_bits,
                                                **({"allocation.weight_bits": weight_bits} if weight_bits else {})})
            state_file = None
        device = config.resolved_device()
        baselines = Path(args.run_dir or Path("runs") / args.profile)
        folder = baseline_folder(baselines, config.seed)
        if state_file is None and not config.model.pretrained and not (folder / "model.pt").is_file():
            raise ValueError(f"profile {args.profile!r} has no shipped model and no cached baseline in {folder}; "
                             f"train one first (python -m cpq_lib.train, or any notebook of the profile)")
    except ValueError as exc:
        return fail(str(exc))
    runtime = configure_for(config)
    data = load_data(config)
    teacher = None if state_file is not None else baseline_model(config, data, baselines, progress=False)[0]
    torch.set_default_dtype(torch.float32)  # the exported graph computes in float32 (data loaders follow)
    if state_file is not None:
        student = _student(build_model(config.model.name, **model_kwargs(config, data)).to(device), config, data, device)
        state = torch.load(state_file, map_location=device, weights_only=True)
        student.load_state_dict(state["model"] if "model" in state else state)
        source = {"run": str(args.run), "state": state_file.name}
    else:
        student = _student(teacher.float(), config, data, device)
        if plan is not None:
            plan.apply_(student)
        else:
            BitPlan.uniform(student, config.allocation.weight_bits, config.allocation.act_bits).apply_(student)
        source = {"plan": args.plan} if plan is not None else {"bits": args.bits}
    student = student.float().eval()
    example = data.example(2).float().to(device)
    export_onnx(student, example, out)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if args.verify:
        report = verify_report(out, student, data, args.verify, args.verify_images, device)
        record = run_record(config, {"source": source, "onnx": out.name, "verify": report, "runtime": runtime,
                                     "command": " ".join(["python -m cpq_lib.deploy", *(argv if argv is not None else sys.argv[1:])])})
        atomic_write_json(json.loads(json.dumps(record, default=str)), out.with_name(out.name + ".verify.json"))
        for name, result in report.items():
            print(f"{name}: top-1 agreement {100 * result['top1_agreement']:.2f}% on {result['inputs']} images, "
                  f"accuracy cpq {100 * result['cpq_accuracy']:.2f}% vs ONNX Runtime {100 * result['onnx_accuracy']:.2f}%, "
                  f"largest logit difference {result['max_abs_difference']:.3g}")
    return 0


def _read_plan(path: Path) -> tuple[BitPlan, int]:
    """A BitPlan from a plan file or an experiment record; the activation bits its layers use."""
    if not path.is_file():
        raise ValueError(f"--plan {path}: no such file")
    try:
        text = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--plan {path} is not a JSON file ({exc})") from None
    plan = BitPlan.from_dict(text["results"]["plan"] if isinstance(text, dict) and "results" in text else text)
    acts = {bits.activation for bits in plan.layers.values() if bits.activation is not None}
    if len(acts) != 1:
        raise ValueError(f"--plan {path}: its layers use activation bits {sorted(acts)}; export needs one width")
    return plan, acts.pop()


def verify_report(path: Path, model: nn.Module, data, split: str, images: int | None, device: str) -> dict[str, dict]:
    """verify_onnx with optimizations off and on, with both accuracies, on ``split``."""
    from .data import part_loader

    batches = [(x.float(), y) for x, y in part_loader(data.subset(split, images), 250)]  # floats in [0, 1]
    return {"optimizations on" if optimize else "optimizations off": verify_onnx(path, model, batches, optimize=optimize)
            for optimize in (False, True)}


if __name__ == "__main__":
    raise SystemExit(main())
