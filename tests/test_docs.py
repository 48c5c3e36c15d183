"""The docs are current and self-contained: the configuration reference is what the schema
generates, every relative link in README.md and docs/ resolves, and nothing in the repository
points at files outside it."""

import re
import subprocess
from pathlib import Path

from raytrain.cli import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_reference_is_current():
    assert (ROOT / "docs/configuration.md").read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `raytrain config --out docs/configuration.md`"
    )


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_nothing_points_outside_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"METHODS\.md|METHODS §|papers/\d|DESIGN\.md|ENVIRONMENT\.md|\.\./shared|issue notes")
    hits = [
        f
        for f in files
        if not f.startswith("tests/test_docs.py") and outside.search((ROOT / f).read_text(errors="ignore"))
    ]
    assert hits == []
