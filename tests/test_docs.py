"""The README stays a front door and the docs stay navigable: links resolve, the reference is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO
from dsft.config import reference_markdown

README = REPO / "README.md"
DOCS = REPO / "docs"
README_LIMIT = 15_000
REGENERATE = ".venv/bin/dsft reference > docs/reference.md"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = _slug(m.group(1))
            n = seen.get(base, 0)
            anchors.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return anchors


def _prose_lines(text: str) -> list[str]:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M).splitlines()


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def test_the_doc_set_exists():
    for name in ("configuration", "reference", "deepspeed", "qlora", "slurm", "reliability", "planning",
                 "measured", "gpu", "training"):
        assert (DOCS / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert not broken, f"{doc.relative_to(REPO)}:\n  " + "\n  ".join(broken)


def test_readme_is_a_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_LIMIT, f"README.md: {len(text)} characters (limit {README_LIMIT}): move depth to docs/"
    # .ci/run calls `make test`, "the README's test command"
    assert "make test" in text and "make demo" in text
    assert "source .venv/bin/activate" in text
    for must in ("-m dsft.run --config", "--module dsft.run --config", "dsft submit", "dsft sbatch",
                 "dsft validate", "dsft train", "dsft report", "examples/chat-smollm2-lora.yaml"):
        assert must in text, f"README.md no longer mentions {must!r}"


def test_readme_lists_every_command():
    from dsft.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = README.read_text(encoding="utf-8")
    missing = [name for name in sub.choices if f"`dsft {name}" not in text]
    assert not missing, f"README.md's commands table misses: {missing}"


def test_reference_is_current():
    generated = reference_markdown() + "\n"  # what `dsft reference` prints
    current = (DOCS / "reference.md").read_text(encoding="utf-8")
    assert current == generated, f"docs/reference.md is stale: regenerate it with `{REGENERATE}` (from the repo root)"


def test_link_checker_catches_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\nsee [b](b.md) and [t](#title) and [x](#nope)\n`[c](c.md)`\n")
    (tmp_path / "b.md").write_text("x\n")
    assert _links(tmp_path / "a.md") == ["b.md", "#title", "#nope"]
    assert _anchors(tmp_path / "a.md") == {"title"}
    assert _slug("Planning a run: `dsft plan`") == "planning-a-run-dsft-plan"
