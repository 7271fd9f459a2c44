"""Every "docs/algorithms.md §N" cited in the code names a section that exists in that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "algorithms.md"
CITE = re.compile(r"docs/algorithms\.md[ ,(]*§(\d+(?:\.\d+)?)")


def defined_sections() -> set[str]:
    """Sections of the doc: anchors ``<a id="s1-2">`` (§1.2) and bold step labels ``**§3.4 …``."""
    text = DOC.read_text(encoding="utf-8")
    ids = {m.replace("-", ".") for m in re.findall(r'<a id="s(\d+(?:-\d+)?)"></a>', text)}
    return ids | set(re.findall(r"\*\*§(\d+\.\d+) ", text))


def citations() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for folder in ("src", "tests"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            for sec in CITE.findall(f.read_text(encoding="utf-8")):
                out.setdefault(sec, []).append(str(f.relative_to(ROOT)))
    return out


def test_sections_are_found():
    assert {"0", "1", "1.1", "1.2", "1.3", "2.3", "3.4", "4.2", "5.3", "6.1", "8"} <= defined_sections()


def test_every_citation_resolves():
    cited = citations()
    assert len(cited) >= 10  # the code does cite the spec
    missing = {sec: files for sec, files in cited.items() if sec not in defined_sections()}
    assert not missing, f"citations of sections docs/algorithms.md does not have: {missing}"
