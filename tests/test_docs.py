"""The documentation site builds from README, docs/ and the stored notebooks, with every page and figure."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))

needs_mkdocs = pytest.mark.skipif(
    not (importlib.util.find_spec("mkdocs") and importlib.util.find_spec("mkdocs_jupyter")) and os.environ.get("CI") != "true",
    reason="mkdocs / mkdocs-jupyter not installed (scripts/docs.sh or scripts/test.sh installs docs/requirements.txt)")


def test_readme_links_to_docs_that_exist():
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(((?:docs|results|figures)/[^)#]+)\)", text)
    assert links and all((REPO / link).exists() for link in links), [l for l in links if not (REPO / l).exists()]


@needs_mkdocs
@pytest.mark.slow
def test_site_has_every_notebook_page_and_figure(tmp_path):
    out = tmp_path / "site"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_docs.py"), str(out)], check=True, cwd=tmp_path,
                   capture_output=True, text=True)
    home = (out / "index.html").read_text(encoding="utf-8")
    assert "What it reproduces" in home and "figures/cifar10/10_ptqsl_granularity.png" in home
    for notebook in NOTEBOOKS:
        page = out / "notebooks" / f"{notebook.stem}.html"
        assert page.is_file(), page
        html = page.read_text(encoding="utf-8")
        assert "jp-Cell" in html or "cell" in html, page  # rendered cells, not a bare link
    for figure in sorted((REPO / "figures").glob("*/*.png")):
        assert (out / figure.relative_to(REPO)).is_file(), figure
    for page in ("reproducibility", "data", "allocation", "ptqsl", "focused", "benchmarks"):
        assert (out / "docs" / f"{page}.html").is_file(), page
    assert "split sizes:" in (out / "notebooks" / "01_baseline.html").read_text(encoding="utf-8")  # stored outputs shown
