"""The README's and docs/*.md's examples run as written, and their links lead somewhere.

Convention: a fenced code block is *runnable* when the line right before its opening fence is

    <!-- runnable -->

(an HTML comment, invisible on the rendered page). A ```bash block runs under `bash -euo pipefail`, a
```python block under this Python; any other language after the marker is an error. Mark only commands
that take seconds on a CPU and need neither a GPU nor ../shared (segmenting examples/, a short generate,
a few-step training run, an ONNX export of it, `--help`); every runnable block of all pages together
should take well under two minutes on 2 cores.

The blocks of one page run in order, in one fresh working folder per page, so a later block may use what
an earlier one wrote (the README trains runs/try, then exports it). The folder holds a copy of examples/
and, beside it, a link named `shared` to the real ../shared when there is one, so the commands read as a
reader types them from the repository root, while everything they write stays in the temporary folder.
The fdm-* commands and python are this interpreter's (its bin folder first on PATH), running this
checkout's code (PYTHONPATH).
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, SHARED

MARKER = "<!-- runnable -->"
RUNNERS = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(path: Path) -> list[tuple[int, str, str, bool]]:
    """(line number, language, code, runnable) of every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, fence, lang = i, m.group(1), m.group(2)
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        runnable = start > 0 and lines[start - 1].strip() == MARKER
        blocks.append((start + 1, lang, "\n".join(lines[start + 1:i]) + "\n", runnable))
        i += 1
    return blocks


def prose(path: Path) -> str:
    """The file's text without its fenced blocks (links inside code are not links)."""
    text, out, fence = path.read_text().splitlines(), [], None
    for line in text:
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append(line)
    return "\n".join(out)


def runnable(path: Path) -> list[tuple[int, str, str]]:
    return [(n, lang, code) for n, lang, code, run in fenced_blocks(path) if run]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_marker_sits_right_above_a_bash_or_python_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == MARKER:
                nxt = lines[i + 1] if i + 1 < len(lines) else ""
                m = FENCE.match(nxt)
                assert m and m.group(2) in RUNNERS, f"{rel(page)}:{i + 1}: {MARKER} must be followed by ```bash or ```python"


def test_the_readme_marks_its_first_commands_runnable():
    code = "".join(c for _, _, c in runnable(ROOT / "README.md"))
    for command in ("fdm-infer segment", "fdm-train --data", "fdm-export onnx", "fdm-infer generate"):
        assert command in code, f"no runnable README block runs `{command}`"


@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=rel)
def test_runnable_blocks_run_as_written(page, tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    before = visible_entries()
    for line, lang, code in runnable(page):
        r = subprocess.run(RUNNERS[lang] + [code], cwd=work, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (f"{rel(page)}:{line}: the {lang} block failed (exit {r.returncode}):\n{code}\n"
                                   f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
    assert visible_entries() == before, "a runnable block wrote into the repository"


def visible_entries() -> list[str]:
    """The repository's top-level names, without dot-files (pytest keeps its cache there)."""
    return sorted(n for n in os.listdir(ROOT) if not n.startswith("."))


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for line in prose(path).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return found


def test_every_docs_page_is_linked_from_the_readme_and_exists():
    text = prose(ROOT / "README.md")
    linked = {t.split("#")[0] for t in LINK.findall(text) if t.startswith("docs/") and t.split("#")[0].endswith(".md")}
    assert linked, "the README links no docs page"
    for target in sorted(linked):
        assert (ROOT / target).is_file(), f"README links {target}, which does not exist"
    pages = {rel(p) for p in PAGES[1:]}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(prose(page)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{rel(page)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)
