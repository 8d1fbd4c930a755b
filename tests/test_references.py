"""Citations in the repository resolve for someone who clones it.

Comments, docstrings and docs cite the upstream source (the paper, AILab-CVC/YOLO-World at a pinned commit,
mmyolo, ultralytics, lvis-api, pycocotools, YOLOX) or a section of docs/reference.md. Notes that live outside
the repository, in the working folders the project was built from, must not be cited: a user cannot open them.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

# Spelled in pieces so that this file does not match its own patterns.
_DANGLING = [
    "yolo-world" + ".md",  # the old reference notes, by file name
    "eval-and-assignment" + ".md",
    "../" + "shared",  # the folder beside the checkout that held them
    "shared/" + "reference",
    "design" + ".md",  # the starting design sketch
    "ref " + "§",  # a bare section number of those notes, with no document named
    "ref: " + "§",
]
_DANGLING_RE = re.compile("|".join(re.escape(p) for p in _DANGLING))
_REFERENCE_DOC = "docs/reference.md"
_SECTION_RE = re.compile(r"§(\d+(?:\.\d+)?)")
_TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".ini", ".json", ""}


def _tracked_text_files(repo_root: Path) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=repo_root, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}); the scan needs `git ls-files`")
    paths = [repo_root / p for p in out.stdout.decode().split("\0") if p]
    return [p for p in paths if p.suffix in _TEXT_SUFFIXES and p.is_file()]


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # a binary file with a text-like name
        return
    yield from enumerate(text.splitlines(), start=1)


def dangling_references(repo_root: Path) -> list[str]:
    """`file:line: text` for every tracked line that cites a document outside the repository."""
    hits = []
    for path in _tracked_text_files(repo_root):
        for number, line in _lines(path):
            if _DANGLING_RE.search(line):
                hits.append(f"{path.relative_to(repo_root)}:{number}: {line.strip()}")
    return hits


def unknown_reference_sections(repo_root: Path) -> list[str]:
    """`file:line: §N` for every `docs/reference.md §N` whose section heading does not exist."""
    headings = (repo_root / _REFERENCE_DOC).read_text(encoding="utf-8")
    known = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", headings, flags=re.MULTILINE))
    missing = []
    for path in _tracked_text_files(repo_root):
        for number, line in _lines(path):
            at = line.find(_REFERENCE_DOC)
            if at < 0:
                continue
            for section in _SECTION_RE.findall(line[at:]):
                if section not in known:
                    missing.append(f"{path.relative_to(repo_root)}:{number}: §{section}")
    return missing


def test_no_citation_of_documents_outside_the_repository(repo_root):
    hits = dangling_references(repo_root)
    assert not hits, (
        "cite the upstream source or a section of docs/reference.md instead of notes outside the repository:\n"
        + "\n".join(hits))


def test_cited_sections_of_the_reference_page_exist(repo_root):
    missing = unknown_reference_sections(repo_root)
    assert not missing, f"no such section in {_REFERENCE_DOC}:\n" + "\n".join(missing)


def test_the_scan_finds_a_dangling_reference(tmp_path):
    """The scan itself works: a tracked file citing the old notes is reported with its file and line."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / _REFERENCE_DOC).write_text("# Facts\n\n## 1. Architecture\n\n### 1.1 Backbone\n")
    (tmp_path / "good.py").write_text('"""BN momentum 0.03 (docs/reference.md §1.1)."""\n')
    missing_section = "§" + "9.9"  # in pieces, so that this file does not cite it
    bad = f"x = 1\n# see {_DANGLING[0]} §1.1\ny = 2  # {_REFERENCE_DOC} {missing_section}\n"
    (tmp_path / "bad.py").write_text(bad)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    assert dangling_references(tmp_path) == [f"bad.py:2: # see {_DANGLING[0]} §1.1"]
    assert unknown_reference_sections(tmp_path) == [f"bad.py:3: {missing_section}"]
