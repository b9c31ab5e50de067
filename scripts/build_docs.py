"""Build the documentation site: README, docs/ and the stored notebooks (rendered, not executed).

    python scripts/build_docs.py [OUT (default site/)] [--serve]

mkdocs reads one source folder, so the pages are staged with the repository's own layout (README.md as
the home page, docs/, notebooks/, figures/, results/README.md, the benchmarks' figures): every relative link and image of the
README keeps working on the site. mkdocs-jupyter renders the notebooks with their stored outputs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAGES = ["reproducibility", "data", "imagenet", "options", "allocation", "ptqsl", "focused", "deploy", "gpu", "benchmarks"]


def config(staged: Path, out: Path) -> str:
    notebooks = sorted(p.name for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    nav = ["  - Home: index.md", "  - Notebooks:"] + [f"    - {n[:-6]}: notebooks/{n}" for n in notebooks]
    nav += ["  - Documentation:"] + [f"    - docs/{p}.md" for p in PAGES if (staged / "docs" / f"{p}.md").is_file()]
    nav += ["  - Results (CIFAR-10): results/cifar10/README.md"]
    return "\n".join([
        "site_name: cpq",
        "site_description: mixed-precision, per-channel quantization",
        f"docs_dir: {staged}",
        f"site_dir: {out}",
        "use_directory_urls: false",
        "theme:",
        "  name: material",
        "  features: [navigation.sections]",
        "markdown_extensions: [tables, admonition, attr_list, pymdownx.superfences]",
        "plugins:",
        "  - search",
        "  - mkdocs-jupyter:",
        "      execute: false",
        "      include_source: true",
        "validation:",
        "  links: {not_found: warn, absolute_links: ignore, unrecognized_links: ignore}",
        "nav:",
        *nav,
    ]) + "\n"


def stage(folder: Path) -> None:
    shutil.copy(REPO / "README.md", folder / "index.md")
    shutil.copytree(REPO / "docs", folder / "docs", ignore=shutil.ignore_patterns("requirements.txt"))
    (folder / "notebooks").mkdir()
    for notebook in sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        shutil.copy(notebook, folder / "notebooks" / notebook.name)
    shutil.copytree(REPO / "figures", folder / "figures")
    (folder / "benchmarks" / "results").mkdir(parents=True)  # the benchmarks' figures (docs link to them)
    for figure in sorted((REPO / "benchmarks" / "results").glob("*.png")):
        shutil.copy(figure, folder / "benchmarks" / "results" / figure.name)
    (folder / "results" / "cifar10").mkdir(parents=True)
    shutil.copy(REPO / "results" / "cifar10" / "README.md", folder / "results" / "cifar10" / "README.md")


def build(out: Path, serve: bool = False) -> Path:
    out = out.resolve()
    with tempfile.TemporaryDirectory(prefix="cpq-docs-") as tmp:
        staged = Path(tmp) / "pages"
        staged.mkdir()
        stage(staged)
        config_file = Path(tmp) / "mkdocs.yml"
        config_file.write_text(config(staged, out), encoding="utf-8")
        command = [sys.executable, "-m", "mkdocs", "serve" if serve else "build", "-f", str(config_file)]
        env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # the theme's notice about its successor, on every build
        subprocess.run(command + ([] if serve else ["--quiet"]), check=True, env=env)
    return out


def main(argv: list[str]) -> int:
    serve = "--serve" in argv
    rest = [a for a in argv if a != "--serve"]
    out = Path(rest[0]) if rest else REPO / "site"
    built = build(out, serve)
    if not serve:
        print(f"site written to {built} (open {built / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
