"""The docs point at things that exist: every relative Markdown link resolves to a file in the repository
(and its #anchor to a heading there), every repository path a doc names in code (`launch/driver.py`,
`configs/paper/`, `teachers/kinds.py:capabilities_for`, `tests/test_x.py::test_y`) exists, and the README
stays a front door. Pure text reading: no models, no Ray.

The tests of the checker itself run it on small documents written to a temporary folder, so a broken
link, a wrong anchor or a missing path is shown to fail."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# Paths a doc may name before they exist, each with the reason. An entry covers its path only while the
# path is missing; once the file lands, the ordinary check applies to it.
PENDING: dict[str, str] = {}  # a path the docs may name before it lands: path -> why

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# A placeholder, not a path: <arm>, {name}, NAME.yaml, stepN, *, $VAR, ...
PLACEHOLDER = re.compile(r"[<>{}*$]|\.\.\.|…|(^|/)(NAME|ARM|RUN|MANIFEST|N)(\.|/|$)|stepN")


def doc_files(root: Path = ROOT) -> list[Path]:
    """README.md, docs/*.md, benchmarks/README.md and every README.md under configs/."""
    files = [root / "README.md", root / "benchmarks" / "README.md", *sorted((root / "docs").glob("*.md")),
             *sorted((root / "configs").rglob("README.md"))]
    return [f for f in files if f.is_file()]


def top_level(root: Path) -> set[str]:
    """The repository's top-level folders: a token naming one of them is a path into the repository."""
    return {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
            and p.name not in {"runs", "build", "__pycache__"} and not p.name.endswith(".egg-info")} | {".ci"}


def split_code(text: str) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """(prose lines, code lines) as (line number, text); fenced blocks are code, the rest prose."""
    prose, code, fenced = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append((n, line))
    return prose, code


def paragraphs(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Consecutive prose lines joined, as (first line number, text): a link or code span may wrap."""
    out: list[tuple[int, str]] = []
    last = None
    for n, line in prose:
        if line.strip() and last == n - 1 and out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        elif line.strip():
            out.append((n, line))
        last = n if line.strip() else None
    return out


def line_of(start: int, text: str, offset: int) -> int:
    return start + text.count("\n", 0, offset)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and code reduced to their text, lower case, punctuation
    other than - and _ dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    for _, line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link in `path` that names no file inside `root`, or an anchor its target lacks."""
    problems = []
    prose, _ = split_code(path.read_text(encoding="utf-8"))
    for start, para in paragraphs(prose):
        text = INLINE_CODE.sub(lambda c: re.sub(r"[^\n]", " ", c.group(0)), para)  # code is not a link
        for m in LINK.finditer(text):
            target, n = m.group(1), line_of(start, text, m.start())
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = Path(os.path.normpath(path.parent / file_part)) if file_part else path
            where = f"{path.relative_to(root)}:{n}: ({target})"
            if not dest.is_relative_to(root):
                problems.append(f"{where} points outside the repository")
            elif not dest.exists():
                problems.append(f"{where} names no file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where} names no heading '#{anchor}' in {dest.relative_to(root)}")
    return problems


def code_tokens(path: Path) -> list[tuple[int, str]]:
    """Words inside inline code spans and fenced blocks."""
    prose, code = split_code(path.read_text(encoding="utf-8"))
    words = [(line_of(start, para, m.start()), w) for start, para in paragraphs(prose)
             for m in INLINE_CODE.finditer(para) for w in m.group(2).split()]
    return words + [(n, w) for n, line in code for w in line.split()]


def defines(py: Path, name: str, prefix: bool = False) -> bool:
    """Whether `py` defines `name` (a def, class or module-level assignment); `prefix`: a name that starts
    with it (a test name elided with ...)."""
    tail = r"\w*" if prefix else r"\b"
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}{tail}|^{re.escape(name)}{tail}\s*[:=]",
                     py.read_text(encoding="utf-8"), re.M) is not None


def path_problems(path: Path, root: Path = ROOT, pending: dict[str, str] = PENDING) -> list[str]:
    """Every repository path named in code in `path` that does not exist (a `file.py:name` or
    `tests/x.py::test_name` also needs that name defined in the file)."""
    tops, problems = top_level(root), []
    for n, word in code_tokens(path):
        word = re.match(r"[\w./:<>{}*$…-]*", word.strip("\"'()[],;")).group(0).removeprefix("./")
        elided = word.endswith("...")
        word = word.removesuffix("...").rstrip(".,:")
        if "/" not in word or word.split("/")[0] not in tops or PLACEHOLDER.search(word):
            continue
        file_part, _, symbol = word.partition(":")
        symbol = symbol.lstrip(":")
        where = f"{path.relative_to(root)}:{n}: `{word}`"
        target = root / file_part
        if not target.exists():
            if file_part not in pending:
                problems.append(f"{where}: no such file or folder in the repository")
        elif target.suffix == ".py" and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", symbol):
            name = symbol.split(".")[0]
            if not defines(target, name, prefix=elided):
                problems.append(f"{where}: {file_part} defines no '{name}'")
    return problems


# ---------------------------------------------------------------------------------------- the repository

DOCS = doc_files()


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_relative_link_resolves(doc):
    assert link_problems(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_repository_path_in_code_exists(doc):
    assert path_problems(doc) == []


def test_the_docs_are_found():
    names = {str(d.relative_to(ROOT)) for d in DOCS}
    assert {"README.md", "docs/usage.md", "benchmarks/README.md", "configs/paper/README.md"} <= names


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md: move detail into docs/"
    assert "make demo" in text and "make test" in text


def test_no_doc_names_a_path_from_one_machine():
    bad = re.compile(r"/work/|/tmp/|pytest-of-|/home/\w|/root/|/Users/")
    hits = [f"{d.relative_to(ROOT)}:{n}: {line.strip()}" for d in DOCS
            for n, line in enumerate(d.read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert hits == []


def test_nothing_points_at_design_notes_outside_the_repository():
    """The project's design is docs/design.md; no file may send a reader to notes kept outside it."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    bad = re.compile(r"\bDESIGN\.md\b|\.\./shared/|/work/shared")
    this = str(Path(__file__).resolve().relative_to(ROOT))  # its own pattern names what it looks for
    hits = [f"{f}:{n}" for f in tracked if f.endswith((".py", ".md", ".yaml", ".toml", ".cfg")) and f != this
            and (ROOT / f).is_file()
            for n, line in enumerate((ROOT / f).read_text(encoding="utf-8").splitlines(), 1) if bad.search(line)]
    assert hits == []


# A section named by its title after its doc: docs/x.md, "Title" / (x.md, "Title") / docs/x.md ("Title")
NAMED_SECTION = re.compile(r"\b((?:docs/)?[\w-]+\.md),? \(?\"([^\"]+)\"")


def section_problems(files: list[str], root: Path = ROOT) -> list[str]:
    """In any of `files` (repository-relative): `docs/x.md §N` where docs/x.md has no heading numbered N, and
    `docs/x.md, "Title"` (a bare x.md is looked for in docs/) where no heading of x.md begins with Title."""
    ref = re.compile(r"\b(docs/[\w-]+\.md) §(\d+)")
    problems = []
    for f in files:
        for n, line in enumerate((root / f).read_text(encoding="utf-8").splitlines(), 1):
            for m in ref.finditer(line):
                doc = root / m.group(1)
                numbered = doc.is_file() and re.search(rf"^#+\s+{m.group(2)}\.\s", doc.read_text(encoding="utf-8"), re.M)
                if not numbered:
                    problems.append(f"{f}:{n}: {m.group(0)} names no such section")
            for m in NAMED_SECTION.finditer(line):
                doc = root / m.group(1) if m.group(1).startswith("docs/") else root / "docs" / m.group(1)
                titles = [] if not doc.is_file() else [
                    h.group(2).replace("`", "") for h in map(HEADING.match, doc.read_text(encoding="utf-8").splitlines()) if h]
                if not any(t.startswith(m.group(2).replace("`", "")) for t in titles):
                    problems.append(f"{f}:{n}: {m.group(1)} has no section \"{m.group(2)}\"")
    return problems


def test_every_section_reference_exists():
    """Code and docs name sections by number (`docs/design.md §4`) or by title (`docs/benchmarks.md, "A run's
    start-up"`); each is a heading there."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    this = str(Path(__file__).resolve().relative_to(ROOT))  # its own examples name a missing section
    files = [f for f in tracked if f.endswith((".py", ".md", ".yaml")) and f != this and (ROOT / f).is_file()]
    assert section_problems(files) == []


# ------------------------------------------------------------------------------------- the checker itself

@pytest.fixture
def repo(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "driver.py").write_text("def run():\n    pass\n\nSTEPS = 3\n")
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## 7. Resume the run\n\ntext\n")
    return tmp_path


def write(repo: Path, text: str) -> Path:
    path = repo / "README.md"
    path.write_text(text)
    return path


def test_checker_accepts_good_links_and_paths(repo):
    doc = write(repo, "[g](docs/guide.md) [r](docs/guide.md#7-resume-the-run) [top](#title) "
                      "[web](https://example.com/x)\n\n# Title\n\n`launch/driver.py`, `launch/`, "
                      "`launch/driver.py:run`, `launch/driver.py:STEPS`, `configs/<arm>.yaml`\n"
                      "```\nopd train launch/driver.py runs/x/final\n```\n")
    assert link_problems(doc, repo) == []
    assert path_problems(doc, repo, {}) == []


@pytest.mark.parametrize("text, expected", [
    ("[g](docs/gide.md)", "names no file"),
    ("[g](docs/guide.md#resume)", "names no heading '#resume'"),
    ("[x](#nowhere)", "names no heading '#nowhere'"),
    ("[up](../outside.md)", "points outside the repository"),
    ("![plot](docs/figures/missing.png)", "names no file"),
])
def test_checker_fails_on_a_broken_link(repo, text, expected):
    (repo.parent / "outside.md").write_text("# outside\n")
    problems = link_problems(write(repo, text + "\n"), repo)
    assert len(problems) == 1 and expected in problems[0]


def test_a_wrapped_link_and_code_span_are_read_whole(repo):
    doc = write(repo, "intro [the\nguide](docs/gide.md) and `opd train\nlaunch/drivre.py` here\n")
    assert [p.split(": (")[0] for p in link_problems(doc, repo)] == ["README.md:1"]
    assert [p.split(": `")[0] for p in path_problems(doc, repo, {})] == ["README.md:2"]


def test_a_link_inside_code_is_not_a_link(repo):
    assert link_problems(write(repo, "`[g](docs/gide.md)`\n```\n[g](docs/gide.md)\n```\n"), repo) == []


@pytest.mark.parametrize("text, expected", [
    ("see `launch/drivre.py`", "no such file"),
    ("see `docs/old/`", "no such file"),
    ("```\nopd train launch/overlap.py\n```", "no such file"),
    ("`launch/driver.py:walk`", "defines no 'walk'"),
    ("see `docs/README.md`", "no such file"),
])
def test_checker_fails_on_a_missing_path(repo, text, expected):
    problems = path_problems(write(repo, text + "\n"), repo, {})
    assert len(problems) == 1 and expected in problems[0]


def test_a_pending_path_is_exempt_only_while_missing(repo):
    doc = write(repo, "`launch/cpu.yaml`\n")
    assert path_problems(doc, repo, {"launch/cpu.yaml": "soon"}) == []
    assert path_problems(doc, repo, {}) != []


def test_the_real_readme_fails_when_a_link_breaks(tmp_path):
    """This repository's own README beside its own folders: clean as it is, one problem per broken link."""
    for folder in ("docs", "benchmarks", "configs"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/usage.md)" in text and "(docs/design.md)" in text
    copy = tmp_path / "README.md"
    copy.write_text(text)
    assert link_problems(copy, tmp_path) == []
    copy.write_text(text.replace("(docs/usage.md)", "(docs/usage-gone.md)", 1)
                    .replace("(docs/design.md)", "(docs/design.md#no-such-section)", 1))
    problems = link_problems(copy, tmp_path)
    assert len(problems) == 2 and "usage-gone" in problems[0] and "no-such-section" in problems[1]


def test_checker_fails_on_a_section_that_does_not_exist(repo):
    (repo / "docs" / "design.md").write_text("# Design\n\n## 4. Losses\n")
    (repo / "launch" / "notes.py").write_text('"""See docs/design.md §4 and docs/design.md §9."""\n')
    problems = section_problems(["launch/notes.py"], repo)
    assert problems == ["launch/notes.py:1: docs/design.md §9 names no such section"]


def test_checker_fails_on_a_section_title_that_does_not_exist(repo):
    (repo / "docs" / "bench.md").write_text("# Bench\n\n## A run's start-up\n\n## Threads: `auto`\n")
    (repo / "launch" / "notes.py").write_text('"""docs/bench.md, "A run\'s start-up"; (bench.md, "Threads: auto");\n'
                                              'docs/bench.md ("The decode loop")."""\n')
    problems = section_problems(["launch/notes.py"], repo)
    assert problems == ['launch/notes.py:2: docs/bench.md has no section "The decode loop"']
