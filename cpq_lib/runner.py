"""Run every notebook of a profile headlessly with papermill: ``python -m cpq_lib.runner --profile quick``.

Executed copies go to the run folder (``runs/<profile>/notebooks``); figures to ``figures/<profile>``.
``--store`` writes the executed notebooks back into ``notebooks/`` (how the stored `quick` outputs
that nbval compares are refreshed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import DEVICES, PROFILES
from .notebook import FIGURES_DIR_ENV, RUN_DIR_ENV
from .cpu_env import set_portable_environment

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def notebook_paths(selection: list[str] | None = None) -> list[Path]:
    paths = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if selection:
        chosen = [p for p in paths if any(p.name.startswith(s) or p.stem == s for s in selection)]
        if not chosen:
            raise SystemExit(f"no notebook matches {selection}; available: {[p.name for p in paths]}")
        return chosen
    return paths


def declared_parameters(path: Path) -> set[str]:
    """Names the notebook's `parameters` cell assigns (papermill injects only those; its own inspector
    trips over comments that hold braces)."""
    import re

    import nbformat

    notebook = nbformat.read(path, as_version=4)
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    return set(re.findall(r"^([A-Za-z_]\w*)\s*=", cells[0].source, re.M)) if cells else set()


def clean_stored_notebook(path: Path) -> None:
    """Drop machine paths, timestamps and the injected-parameters cell papermill adds, so stored notebooks
    diff only on content and their `parameters` cell is what a reader edits."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    notebook.metadata.pop("papermill", None)
    notebook.metadata.pop("widgets", None)  # progress-bar widget state
    # papermill's injected cell re-set profile/seed/device after the `parameters` cell: kept, it would
    # silently undo a reader's edit of that cell in JupyterLab (the stored runs use its defaults)
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def kernel_manager_class() -> type | None:
    """A kernel manager that asks for CurveZMQ transport encryption where jupyter_client offers it.

    ipykernel >= 7.3 warns on every kernel start when kernel and client talk over plain TCP; with
    keys provisioned ("auto": when the kernelspec declares support) the runner's output stays clean.
    Older jupyter_client versions have no such policy: None keeps their default manager.
    """
    from jupyter_client import KernelManager

    if "transport_encryption" not in KernelManager.class_trait_names():
        return None

    class EncryptedKernelManager(KernelManager):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.transport_encryption = "auto"

    return EncryptedKernelManager


@contextmanager
def kernel_environment(profile: str) -> Iterator[None]:
    """The environment notebook kernels start with, restored afterwards (callers keep theirs).

    Progress bars off (they would fill stored outputs); no folder redirects (the runner passes its
    folders); for `quick`, CPU kernels pinned before the kernels import torch (cpq_lib.runtime).
    """
    saved = dict(os.environ)
    try:
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.pop(RUN_DIR_ENV, None)
        os.environ.pop(FIGURES_DIR_ENV, None)
        if profile == "quick":
            set_portable_environment()
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def notebook_parameters(profile: str, seed: int, device: str, data_root: str | None, run_dir: Path,
                        figures_dir: Path) -> dict[str, object]:
    """Parameters injected into every notebook.

    Folders are passed only when they are not the notebooks' own defaults (../runs/<profile>,
    ../figures/<profile>): stored notebooks then carry no folder, so the test suite can redirect their
    outputs with CPQ_RUN_DIR / CPQ_FIGURES_DIR. Relative paths keep machine paths out of outputs.
    """
    parameters: dict[str, object] = {"profile": profile, "seed": seed, "device": device}
    for name, folder, default in (("run_dir", run_dir, REPO / "runs" / profile),
                                  ("figures_dir", figures_dir, REPO / "figures" / profile)):
        if Path(folder).resolve() != default.resolve():
            parameters[name] = os.path.relpath(folder, NOTEBOOKS)
    if data_root:
        parameters["data_root"] = os.path.abspath(data_root)
    return parameters


def run(profile: str, data_root: str | None, device: str, run_dir: Path, figures_dir: Path,
        selection: list[str] | None = None, store: bool = False, seed: int = 0) -> list[tuple[str, float]]:
    import papermill

    executed_dir = run_dir / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    figures_dir.mkdir(parents=True, exist_ok=True)
    parameters = notebook_parameters(profile, seed, device, data_root, run_dir, figures_dir)
    manager = kernel_manager_class()
    engine_options = {"kernel_manager_class": manager} if manager is not None else {}
    timings = []
    with kernel_environment(profile):
        for path in notebook_paths(selection):
            started = time.perf_counter()
            print(f"[{profile}] {path.name} ...", flush=True)
            output = path if store else executed_dir / path.name
            declared = declared_parameters(path)  # a results notebook takes no profile or seed
            papermill.execute_notebook(str(path), str(output), parameters={k: v for k, v in parameters.items() if k in declared},
                                       cwd=str(NOTEBOOKS),
                                       kernel_name="python3", progress_bar=False, report_mode=False, **engine_options)
            if store:
                clean_stored_notebook(output)
            timings.append((path.name, time.perf_counter() - started))
            print(f"[{profile}] {path.name} done in {timings[-1][1]:.1f} s", flush=True)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--data-root", default=None, help="zip, image-folder root or torchvision root (cifar10/paper)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-dir", default=None, help="default: runs/<profile>")
    parser.add_argument("--figures-dir", default=None, help="default: figures/<profile>")
    parser.add_argument("--only", nargs="+", default=None, metavar="PREFIX", help="notebook name prefixes, e.g. 01 03")
    parser.add_argument("--store", action="store_true", help="write executed notebooks back into notebooks/")
    args = parser.parse_args(argv)
    if args.data_root and not Path(args.data_root).exists():
        parser.error(f"--data-root {args.data_root} does not exist")
    if args.store and args.profile != "quick":
        parser.error("--store keeps the stored notebooks on the quick profile; run other profiles without it")
    run_dir = Path(args.run_dir or REPO / "runs" / args.profile).resolve()
    figures_dir = Path(args.figures_dir or REPO / "figures" / args.profile).resolve()
    timings = run(args.profile, args.data_root, args.device, run_dir, figures_dir, args.only, args.store, args.seed)
    total = sum(t for _, t in timings)
    print(f"ran {len(timings)} notebook(s) with profile {args.profile} in {total:.1f} s; figures in {figures_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
