"""Exit 1 if a figure the test suite's notebook runs wrote differs, byte for byte, from the committed one.

    python scripts/compare_figures.py WRITTEN_DIR [REFERENCE_DIR (default figures/quick)]

The stored `quick` notebooks' figures are committed; the same numbers render to the same bytes, and
the pinned float64 `quick` numerics make the numbers the same on any x86-64 CPU with AVX2. A difference
here means `scripts/reproduce.sh` would leave `git status` dirty on this machine. Only figures that
were written are compared (a suite narrowed with -k runs fewer notebooks). The results notebook
(10_*) draws the committed CIFAR-10 results whatever the profile: its files are compared with
figures/cifar10/.
"""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS_FIGURES = {"10_": "cifar10"}  # notebook prefix -> the figure folder of the results it draws


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    written = Path(argv[0])
    reference = Path(argv[1]) if len(argv) == 2 else Path(__file__).resolve().parent.parent / "figures" / "quick"
    files = sorted(p for p in written.iterdir() if p.is_file()) if written.is_dir() else []
    if not files:
        print(f"compare_figures: no figures under {written} (no notebook ran); nothing to compare")
        return 0
    def committed(path: Path) -> Path:
        folder = reference.parent / RESULTS_FIGURES[path.name[:3]] if path.name[:3] in RESULTS_FIGURES else reference
        return folder / path.name

    missing = [p.name for p in files if not committed(p).is_file()]
    differ = [p.name for p in files if committed(p).is_file() and p.read_bytes() != committed(p).read_bytes()]
    if missing or differ:
        if differ:
            print(f"figures that differ from {reference}: {', '.join(differ)}", file=sys.stderr)
        if missing:
            print(f"figures not committed under {reference}: {', '.join(missing)}", file=sys.stderr)
        print("the stored notebooks' figures are not reproduced on this machine (see docs/reproducibility.md)", file=sys.stderr)
        return 1
    print(f"compare_figures: all {len(files)} figures written by the notebooks equal {reference} byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
