"""The course tool: the manifest, the exporter, the sync check, the chapter runner and the claims ledger.

Hand-written plumbing (DESIGN.md, "How code flows from a chapter into dslib"); no chapter teaches it.

    python -m dslib.book export     write dslib/<module>.py from the chapters' `#| export` cells
    python -m dslib.book check      fail when a generated module, a notebook pair or the manifest is out of step
    python -m dslib.book list       the chapters, their modules, budgets and papers
    python -m dslib.book run [00 ...] [--scale small|full] [--timeout SECONDS]
                                    execute chapters' notebooks, timed against their budgets
    python -m dslib.book ledger     every chapter's claims ledger: the paper's claims next to our measurements
    python -m dslib.book reading    each chapter against the reader's standard (prose share, code cells, diagrams)
    python -m dslib.book html [--out DIR]
                                    the course as a static site (_build/html): a page per chapter from its executed
                                    notebook, the chapter map and every chapter's claims ledger (dslib.site)
    python -m dslib.book git-filter once per clone: `git add` strips notebooks' outputs (nbstripout as a git filter)

The manifest is `book.toml` at the root of the repository (the folder that holds it; `DSLIB_ROOT` overrides the search).
Chapters are jupytext percent-format scripts, `chapters/NN_slug.py`, paired with `chapters/NN_slug.ipynb`. They use
nbdev's directives: `#| default_exp NAME` once per chapter, and `#| export` (or `#| export NAME`) as the first line of
each cell that belongs in dslib.

The ledger half (`Ledger`) is also used from inside chapters, where only dslib's own dependencies are installed, so the
notebook tooling (jupytext, nbformat, nbclient) is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import html
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BookError",
    "Book",
    "Chapter",
    "Cell",
    "RunResult",
    "Ledger",
    "MANIFEST",
    "GENERATED_MARK",
    "find_root",
    "load_book",
    "build_dir",
    "parse_cells",
    "chapter_modules",
    "export",
    "check",
    "run_chapters",
    "read_ledgers",
    "format_table",
    "main",
]

MANIFEST = "book.toml"
GENERATED_MARK = "# GENERATED FILE"
DEFAULT_TIMEOUT_S = 600

_BOOK_FIELDS = {"title": str, "package": str, "repository": str}
_CHAPTER_FIELDS = ("number", "title", "notebook", "source", "modules", "papers", "budget_s")


class BookError(Exception):
    """A problem with the manifest, a chapter's directives or the files they name; the message says which."""


# --------------------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Chapter:
    """One `[[chapter]]` entry of book.toml. Paths are relative to the root, as written there."""

    number: str
    title: str
    notebook: str
    source: str
    modules: tuple[str, ...]
    papers: tuple[str, ...]
    budget_s: int


@dataclass(frozen=True)
class Book:
    """The whole manifest: the `[book]` table and the chapters in order."""

    root: Path
    title: str
    package: str
    repository: str
    chapters: tuple[Chapter, ...]

    def chapter(self, number: str) -> Chapter:
        """The chapter with this number ("00"); a `BookError` listing the numbers when there is none."""
        for chapter in self.chapters:
            if chapter.number == number:
                return chapter
        known = ", ".join(c.number for c in self.chapters) or "none"
        raise BookError(f"{MANIFEST}: no chapter {number!r} (chapters: {known})")

    def owner(self, module: str) -> Chapter | None:
        """The chapter that owns a dslib module, or None."""
        for chapter in self.chapters:
            if module in chapter.modules:
                return chapter
        return None

    @property
    def modules(self) -> list[str]:
        """Every generated module, in chapter order."""
        return [m for chapter in self.chapters for m in chapter.modules]

    def module_path(self, module: str) -> Path:
        """Where a generated module lives: <root>/<package>/<module>.py."""
        return self.root / self.package / f"{module}.py"


def find_root(start: Path | str | None = None) -> Path:
    """The folder that holds book.toml: `DSLIB_ROOT` when set, else the first one found walking up from `start`
    (default: the current directory). Raises `BookError` when there is none."""
    env = os.environ.get("DSLIB_ROOT", "").strip()
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / MANIFEST).is_file():
            raise BookError(f"DSLIB_ROOT={env!r} has no {MANIFEST}")
        return root
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / MANIFEST).is_file():
            return folder
    raise BookError(
        f"no {MANIFEST} found in {here} or any folder above it: run from inside the course repository, "
        f"or set DSLIB_ROOT to its root"
    )


def _field(table: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """`table[name]`, checked to be present and of type `kind` (bools are not ints)."""
    if name not in table:
        raise BookError(f"{MANIFEST}: {where}: missing field '{name}'")
    value = table[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BookError(f"{MANIFEST}: {where}: field '{name}' must be {kind.__name__}, got {value!r}")
    return value


def _str_list(table: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    """`table[name]`, checked to be a list of strings."""
    value = _field(table, name, list, where)
    for item in value:
        if not isinstance(item, str):
            raise BookError(f"{MANIFEST}: {where}: field '{name}' must be a list of strings, got item {item!r}")
    return tuple(value)


def _parse_chapter(entry: Any, index: int) -> Chapter:
    """Validate one `[[chapter]]` table (index counts from 1, for messages before the number is known)."""
    where = f"[[chapter]] #{index}"
    if not isinstance(entry, dict):
        raise BookError(f"{MANIFEST}: {where} must be a table, got {entry!r}")
    unknown = sorted(set(entry) - set(_CHAPTER_FIELDS))
    if unknown:
        raise BookError(f"{MANIFEST}: {where}: unknown field(s) {unknown}; allowed: {list(_CHAPTER_FIELDS)}")
    number = _field(entry, "number", str, where)
    if not re.fullmatch(r"[0-9A-Za-z_-]+", number):
        raise BookError(f"{MANIFEST}: {where}: field 'number' must be a string like \"00\", got {number!r}")
    where = f"chapter {number}"
    title = _field(entry, "title", str, where)
    notebook = _field(entry, "notebook", str, where)
    source = _field(entry, "source", str, where)
    if not notebook.endswith(".ipynb"):
        raise BookError(f"{MANIFEST}: {where}: field 'notebook' must name an .ipynb file, got {notebook!r}")
    if not source.endswith(".py"):
        raise BookError(f"{MANIFEST}: {where}: field 'source' must name a .py file, got {source!r}")
    modules = _str_list(entry, "modules", where)
    for module in modules:
        if not module.isidentifier() or module.startswith("_"):
            raise BookError(
                f"{MANIFEST}: {where}: field 'modules' holds {module!r}, which is not a public module name"
            )
    if len(set(modules)) != len(modules):
        raise BookError(f"{MANIFEST}: {where}: field 'modules' lists a module twice: {list(modules)}")
    papers = _str_list(entry, "papers", where)
    budget_s = _field(entry, "budget_s", int, where)
    if budget_s <= 0:
        raise BookError(f"{MANIFEST}: {where}: field 'budget_s' must be > 0 seconds, got {budget_s}")
    return Chapter(number, title, notebook, source, modules, papers, budget_s)


def load_book(root: Path | str | None = None) -> Book:
    """Read and validate `<root>/book.toml` (root: default `find_root()`).

    Checks the fields and their types, that chapter numbers are unique and that every module has one owner; it does
    not look at the files the manifest names (`check` does). Raises `BookError` naming book.toml and the field.
    """
    root = Path(root).resolve() if root is not None else find_root()
    path = root / MANIFEST
    if not path.is_file():
        raise BookError(f"{MANIFEST} not found in {root}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise BookError(f"{MANIFEST}: not valid TOML: {err}") from None
    meta = data.get("book")
    if not isinstance(meta, dict):
        raise BookError(f"{MANIFEST}: missing the [book] table (title, package, repository)")
    title, package, repository = (_field(meta, name, kind, "[book]") for name, kind in _BOOK_FIELDS.items())
    if not package.isidentifier():
        raise BookError(f"{MANIFEST}: [book]: field 'package' must be a package name, got {package!r}")
    entries = data.get("chapter", [])
    if not isinstance(entries, list):
        raise BookError(f"{MANIFEST}: 'chapter' must be an array of tables ([[chapter]])")
    chapters = tuple(_parse_chapter(entry, i) for i, entry in enumerate(entries, start=1))
    seen: dict[str, Chapter] = {}
    owners: dict[str, Chapter] = {}
    for chapter in chapters:
        if chapter.number in seen:
            raise BookError(f"{MANIFEST}: field 'number': chapter number {chapter.number!r} is used twice")
        seen[chapter.number] = chapter
        for module in chapter.modules:
            if module in owners:
                raise BookError(
                    f"{MANIFEST}: field 'modules': module {module!r} has two owners: "
                    f"chapter {owners[module].number} and chapter {chapter.number}"
                )
            owners[module] = chapter
    return Book(root, title, package, repository, chapters)


def build_dir(root: Path | None = None) -> Path:
    """Where runs write their outputs: `DSLIB_BUILD` when set, else `<root>/_build` (root: the repository's, or the
    current directory when dslib is used outside the repository)."""
    env = os.environ.get("DSLIB_BUILD", "").strip()
    if env:
        return Path(env).expanduser().resolve()
    if root is None:
        try:
            root = find_root()
        except BookError:
            root = Path.cwd()
    return Path(root) / "_build"


# --------------------------------------------------------------------------------------------------------------------
# Chapters: cells, directives, export


@dataclass(frozen=True)
class Cell:
    """A cell of a percent-format script: its kind ("code", "markdown", "raw"), the 1-based line number of its
    `# %%` marker, and the lines after the marker up to the next one."""

    kind: str
    line: int
    lines: tuple[str, ...]


# As jupytext reads them: `# %%` alone, or followed by a space and a title and/or [cell type] and metadata.
_MARKER = re.compile(r"^\s*#\s*%%(?:\s(?P<rest>.*))?$")
_NON_CODE = re.compile(r"\[(markdown|md|raw)\]")
_DIRECTIVE = re.compile(r"^#\|\s*(?P<name>[\w-]+)(?P<args>.*)$")
_EXPORTS = {"export", "exporti", "exports"}


def parse_cells(text: str) -> list[Cell]:
    """Split a jupytext percent-format script into cells. Lines before the first `# %%` (the header) are skipped."""
    cells: list[Cell] = []
    kind, start, body = "", 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _MARKER.match(line)
        if match:
            if kind:
                cells.append(Cell(kind, start, tuple(body)))
            found = _NON_CODE.search(match.group("rest") or "")
            kind = {"md": "markdown"}.get(found.group(1), found.group(1)) if found else "code"
            start, body = number, []
        elif kind:
            body.append(line)
    if kind:
        cells.append(Cell(kind, start, tuple(body)))
    return cells


def _directives(cell: Cell) -> list[tuple[int, str, list[str]]]:
    """The nbdev directives at the top of a code cell: (line number, name, arguments), e.g. (12, "export", ["mla"])."""
    found = []
    for offset, line in enumerate(cell.lines, start=1):
        if not line.strip():
            continue
        match = _DIRECTIVE.match(line.strip())
        if not match:
            break
        found.append((cell.line + offset, match.group("name"), match.group("args").split()))
    return found


def _strip_blank(lines: Sequence[str]) -> list[str]:
    """Drop leading and trailing blank lines."""
    lines = list(lines)
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def _header(chapter: Chapter) -> str:
    """The two comment lines that open a generated module."""
    return (
        f"{GENERATED_MARK}: do not edit. Written by `python -m dslib.book export` from {chapter.source} "
        f"(chapter {chapter.number}).\n"
        "# Edit the chapter, then run the export again.\n"
    )


def chapter_modules(book: Book, chapter: Chapter) -> dict[str, str]:
    """The text of every module a chapter exports, {module: text}, from its source's `#| export` cells.

    Raises `BookError` naming the source and line when a cell exports to a module the chapter does not own, when a
    bare `#| export` has no `#| default_exp` to go to, when `#| default_exp` appears twice, or when a module the
    chapter owns gets no export cell.
    """
    path = book.root / chapter.source
    if not path.is_file():
        raise BookError(f"{chapter.source} does not exist (chapter {chapter.number} in {MANIFEST})")
    cells = [cell for cell in parse_cells(path.read_text(encoding="utf-8")) if cell.kind == "code"]
    owned = ", ".join(chapter.modules) or "nothing"

    def unowned(line: int, module: str, directive: str) -> BookError:
        return BookError(
            f"{chapter.source}, line {line}: `{directive}` targets module {module!r}, which chapter "
            f"{chapter.number} does not own in {MANIFEST} (it owns: {owned})"
        )

    default: str | None = None
    default_line = 0
    for cell in cells:
        for line, name, args in _directives(cell):
            if name != "default_exp":
                continue
            if len(args) != 1:
                raise BookError(f"{chapter.source}, line {line}: `#| default_exp` takes one module name")
            if default is not None:
                raise BookError(
                    f"{chapter.source}, line {line}: a second `#| default_exp` (the first is at line {default_line})"
                )
            default, default_line = args[0], line
            if default not in chapter.modules:
                raise unowned(line, default, f"#| default_exp {default}")

    parts: dict[str, list[str]] = {module: [] for module in chapter.modules}
    for cell in cells:
        directives = _directives(cell)
        if not directives or directives[0][1] not in _EXPORTS:
            continue
        line, name, args = directives[0]
        if len(args) > 1:
            raise BookError(f"{chapter.source}, line {line}: `#| {name}` takes at most one module name, got {args}")
        if args:
            module = args[0]
            if module not in parts:
                raise unowned(line, module, f"#| {name} {module}")
        elif default is None:
            raise BookError(
                f"{chapter.source}, line {line}: `#| {name}` without a module name, and the chapter has no "
                f"`#| default_exp`"
            )
        else:
            module = default
        directive_lines = {number for number, _, _ in directives}
        body = [text for offset, text in enumerate(cell.lines, start=1) if cell.line + offset not in directive_lines]
        code = "\n".join(_strip_blank(body))
        if code:
            parts[module].append(code)

    for module, cell_texts in parts.items():
        if not cell_texts:
            raise BookError(
                f"{chapter.source}: chapter {chapter.number} owns module {module!r} in {MANIFEST}, "
                f"but no `#| export` cell exports to it"
            )
    return {module: _header(chapter) + "\n" + "\n\n\n".join(texts) + "\n" for module, texts in parts.items()}


def _is_generated(path: Path) -> bool:
    """True when a file's first line is the generated-file header."""
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().startswith(GENERATED_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def _rel(book: Book, path: Path) -> str:
    """A path as the messages show it: relative to the root, with forward slashes."""
    try:
        return path.relative_to(book.root).as_posix()
    except ValueError:
        return str(path)


def export(root: Path | str | None = None, force: bool = False, numbers: Sequence[str] | None = None) -> list[Path]:
    """Write the chapters' modules into the package (every chapter, or those numbered in `numbers`); return the files
    that changed (unchanged ones are left alone).

    Everything is computed before anything is written, so an error in one chapter writes nothing. An existing module
    that is hand-written (no generated-file header) is not replaced unless `force` is set.
    """
    book = load_book(root)
    chapters = [book.chapter(n) for n in numbers] if numbers else list(book.chapters)
    texts: dict[Path, str] = {}
    for chapter in chapters:
        for module, text in chapter_modules(book, chapter).items():
            path = book.module_path(module)
            if path.exists() and not force and not _is_generated(path):
                raise BookError(
                    f"{_rel(book, path)} exists and is hand-written (its first line is not `{GENERATED_MARK}...`), "
                    f"but chapter {chapter.number} owns module {module!r} in {MANIFEST}: move it away, or rerun "
                    f"with --force to replace it with the chapter's export"
                )
            texts[path] = text
    written = []
    for path, text in texts.items():
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------------------------
# Check


def _stored_outputs(notebook: dict[str, Any]) -> list[int]:
    """The (1-based) code cells of a notebook that store outputs or an execution count."""
    return [
        i
        for i, cell in enumerate(notebook.get("cells", []), start=1)
        if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]


def _staged_notebook(book: Book, notebook: Path) -> tuple[dict[str, Any] | None, bool]:
    """The notebook as `git add` has staged it (what a commit would store) and True, when the book is a git checkout
    that tracks it; (None, False) otherwise (no git, not a checkout, or an untracked file)."""
    try:
        done = subprocess.run(["git", "-C", str(book.root), "show", f":{_rel(book, notebook)}"], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None, False
    if done.returncode != 0:
        return None, False
    try:
        return json.loads(done.stdout.decode("utf-8")), True
    except (ValueError, UnicodeDecodeError):
        return None, False


def _pair_cells_without_jupytext(path: Path) -> list[tuple[str, str]]:
    """(cell type, stripped source) of a percent-format .py or an .ipynb, read without jupytext: enough to compare a
    pair where the dev extra is not installed (markdown lines lose their leading `# `; code is kept as written)."""
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text(encoding="utf-8"))
        return [(c["cell_type"], "".join(c.get("source", "")).strip()) for c in nb.get("cells", [])]
    out = []
    for cell in parse_cells(path.read_text(encoding="utf-8")):
        lines = cell.lines if cell.kind == "code" else [re.sub(r"^# ?", "", line) for line in cell.lines]
        out.append((cell.kind, "\n".join(lines).strip()))
    return out


def _pair_difference(source: Path, notebook: Path) -> str | None:
    """How a chapter's .py and .ipynb differ, comparing (cell type, stripped source) cell by cell; None when alike.
    Uses jupytext when it is installed, and a plain reading of both files otherwise."""
    try:
        import jupytext
    except ImportError:
        cells = _pair_cells_without_jupytext
    else:
        def cells(path: Path) -> list[tuple[str, str]]:
            return [(cell.cell_type, cell.source.strip()) for cell in jupytext.read(path).cells]

    from_py, from_nb = cells(source), cells(notebook)
    for i, (a, b) in enumerate(zip(from_py, from_nb), start=1):
        if a != b:
            return f"first difference at cell {i}"
    if len(from_py) != len(from_nb):
        return f"the .py has {len(from_py)} cells, the .ipynb {len(from_nb)}"
    return None


def _check_chapter(book: Book, chapter: Chapter) -> list[str]:
    """The problems with one chapter: its files, its pairing, its stored outputs, and its generated modules."""
    problems = []
    source, notebook = book.root / chapter.source, book.root / chapter.notebook
    for kind, path in (("source", source), ("notebook", notebook)):
        if not path.is_file():
            problems.append(f"{MANIFEST}: chapter {chapter.number}'s {kind} {_rel(book, path)} does not exist")

    if source.is_file():
        if book.repository not in source.read_text(encoding="utf-8"):
            problems.append(
                f"{chapter.source} does not contain the repository address {book.repository} from {MANIFEST} "
                f"(its set-up cell installs {book.package} from there)"
            )
        try:
            modules = chapter_modules(book, chapter)
        except BookError as err:
            problems.append(str(err))
        else:
            for module, text in modules.items():
                path = book.module_path(module)
                if not path.is_file():
                    problems.append(
                        f"{_rel(book, path)} is missing ({chapter.source} exports it): "
                        f"run `python -m dslib.book export`"
                    )
                elif path.read_text(encoding="utf-8") != text:
                    problems.append(
                        f"{_rel(book, path)} differs from what {chapter.source} exports: "
                        f"run `python -m dslib.book export`"
                    )

    if notebook.is_file():
        try:
            stored = json.loads(notebook.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            problems.append(f"{chapter.notebook} is not a readable notebook: {err}")
            return problems
        # Outputs are a problem only where a commit would keep them. In a git checkout that is the staged copy: a reader
        # who runs a chapter in JupyterLab (which autosaves its outputs) breaks nothing, and `python -m dslib.book
        # git-filter` makes `git add` strip them. Outside git (an unpacked archive) the file itself is judged.
        staged, tracked = _staged_notebook(book, notebook)
        dirty = _stored_outputs(staged if tracked else stored)
        if dirty:
            where = f"{chapter.notebook} as staged for commit" if tracked else chapter.notebook
            problems.append(
                f"{where} stores outputs or execution counts (code cells {', '.join(map(str, dirty))}): run "
                f"`python -m dslib.book git-filter` once, so that `git add` strips them, and add it again (or "
                f"regenerate it clean with `jupytext --to ipynb {chapter.source}`)"
            )
        if source.is_file():
            try:
                difference = _pair_difference(source, notebook)
            except Exception as err:  # a notebook jupytext cannot read
                problems.append(f"{chapter.notebook} could not be compared with {chapter.source}: {err}")
            else:
                if difference:
                    problems.append(
                        f"{chapter.notebook} is out of sync with {chapter.source} ({difference}): "
                        f"run `jupytext --sync {chapter.source}`"
                    )
    if source.is_file():
        problems += solution_problems(book, chapter)
    return problems


def check(root: Path | str | None = None) -> list[str]:
    """Everything that is out of step in the book, as a list of messages that each name the file; [] when all is well.

    Looks for: a manifest that does not validate or names missing files; generated modules that are missing or differ
    from what their chapter exports; export directives that do not match the manifest; a chapter whose .py and .ipynb
    differ, or whose notebook stores outputs where a commit would keep them (the staged copy in a git checkout, the file
    itself elsewhere); a chapter source without the repository address; worked solutions that read names nothing
    defines or import names the package lacks (solution_problems); and generated modules that no chapter owns any
    more.
    """
    try:
        book = load_book(root)
    except BookError as err:
        return [str(err)]
    problems = [problem for chapter in book.chapters for problem in _check_chapter(book, chapter)]
    package = book.root / book.package
    owned = set(book.modules)
    if package.is_dir():
        for path in sorted(package.glob("*.py")):
            if path.stem not in owned and _is_generated(path):
                problems.append(
                    f"{_rel(book, path)} is a generated module that no chapter owns in {MANIFEST}: "
                    f"delete it, or list it under its chapter's modules"
                )
    return problems


# --------------------------------------------------------------------------------------------------------------------
# Tables


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: a header, a rule, one line per row; columns of numbers right-aligned, the rest left."""
    table = [list(row) for row in rows]
    for row in table:
        if len(row) != len(headers):
            raise ValueError(f"a table row has {len(row)} cells for {len(headers)} columns: {row!r}")
    right = [
        bool(table) and all(isinstance(row[i], (int, float)) and not isinstance(row[i], bool) for row in table)
        for i in range(len(headers))
    ]
    text = [[("" if value is None else str(value)).replace("\n", " ") for value in row] for row in table]
    widths = [max([len(str(h))] + [len(row[i]) for row in text]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str], align_right: Sequence[bool]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, align_right)).rstrip()

    lines = [line([str(h) for h in headers], right), line(["-" * w for w in widths], right)]
    lines += [line(row, right) for row in text]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# The reader's standard: how much of a chapter is prose, how long its code cells run, how many diagrams it draws

PROSE_SHARE_MIN = 0.30  # prose: at least 30% of a chapter's non-blank lines
CODE_CELL_MAX = 80  # no code cell a reader must scroll past runs over 80 non-blank lines
# A diagram: a draw_* function the chapter defines, or an image it embeds from the repository (a relative path: the
# Colab and Binder badges, images from the web, are not diagrams).
_DIAGRAM_RE = re.compile(r"^\s*def draw_\w*\(|!\[[^\]]*\]\((?![a-z]+:)[^)]*\.(?:svg|png)\)")


_EXERCISE_RE = re.compile(r"^(\d+)\.\s+(★*)\s*\*\*(.+?)\*\*")
_FENCE_RE = re.compile(r"^[ \t]*```python[ \t]*\n(.*?)^[ \t]*```", re.M | re.S)
_RUN_SOLUTIONS_RE = re.compile(r"run_solutions\(\s*[\"'](\d+)[\"']\s*,\s*globals\(\)\s*,\s*\(([\d,\s]*)\)")


@dataclass(frozen=True)
class Exercise:
    """One exercise of a chapter's "## Exercises" section: its number, title, difficulty (the count of ★), whether it
    has a hint and a worked solution (`<details><summary>Hint</summary>`, `...Solution...`), and the Python blocks
    of its solution, dedented."""

    number: int
    title: str
    stars: int
    has_hint: bool
    has_solution: bool
    code: tuple[str, ...]


def exercises(text: str) -> list[Exercise]:
    """The exercises of a chapter's percent-format source (the markdown of its "## Exercises" section)."""
    body: list[str] = []
    inside = False
    for cell in parse_cells(text):
        if cell.kind != "markdown":
            continue
        for raw in cell.lines:
            line = raw[2:] if raw.startswith("# ") else raw[1:] if raw.startswith("#") else raw
            if line.startswith("## "):
                inside = line.strip().startswith("## Exercises")
            elif inside:
                body.append(line)
    items: list[tuple[re.Match, list[str]]] = []
    for line in body:
        match = _EXERCISE_RE.match(line)
        if match:
            items.append((match, []))
        elif items:
            items[-1][1].append(line)
    found = []
    for match, lines in items:
        text_of = "\n".join(lines) + "\n"
        at = text_of.find("<summary>Solution</summary>")
        solution = text_of[at:] if at >= 0 else ""
        solution = solution[:solution.find("</details>")] if "</details>" in solution else solution
        code = tuple(textwrap.dedent(block) for block in _FENCE_RE.findall(solution))
        found.append(Exercise(int(match.group(1)), match.group(3), len(match.group(2)),
                              "<summary>Hint</summary>" in text_of, at >= 0, code))
    return found


def run_solutions(chapter: str, namespace: dict[str, Any], numbers: Sequence[int],
                  root: Path | str | None = None) -> dict[int, float]:
    """Run the code of the worked solutions of `chapter`'s exercises `numbers` in `namespace` (a chapter passes its
    globals(), after its checks), in order, and return each one's seconds. A chapter calls this for the solutions
    that take seconds, so that nbval runs them with the chapter; a failing solution raises, naming its exercise."""
    book = load_book(root)
    source = book.root / book.chapter(chapter).source
    by_number = {e.number: e for e in exercises(source.read_text(encoding="utf-8"))}
    seconds: dict[int, float] = {}
    for n in numbers:
        if n not in by_number or not by_number[n].code:
            raise BookError(f"chapter {chapter}: exercise {n} has no solution with Python code")
        start = time.perf_counter()
        for block in by_number[n].code:
            try:
                exec(compile(block, f"<chapter {chapter}, exercise {n}>", "exec"), namespace)
            except Exception as err:
                raise RuntimeError(f"chapter {chapter}: the solution of exercise {n} failed: "
                                   f"{type(err).__name__}: {err}") from err
        seconds[n] = time.perf_counter() - start
    return seconds


def _bound_names(tree: ast.AST, imports: bool = True) -> set[str]:
    """Every name that code binds anywhere (assignments, loop and with targets, defs, classes, imports unless
    imports=False, arguments, except clauses), at any depth: generous on purpose, so that a check built on it names
    only true strays."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)) and imports:
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _code_trees(text: str) -> list[ast.Module]:
    """The syntax trees of a chapter's code cells; a cell that is not Python the checker can read is left out (the
    chapter's own run catches real errors)."""
    trees = []
    for cell in parse_cells(text):
        if cell.kind == "code":
            try:
                trees.append(ast.parse("\n".join(cell.lines)))
            except SyntaxError:
                continue
    return trees


def _module_names(book: Book, module: str) -> set[str] | None:
    """The names a dslib module binds (read from its source, not imported); None when it has no source file."""
    parts = module.split(".")
    if parts[0] != book.package:
        return None
    path = book.root.joinpath(*parts).with_suffix(".py")
    if not path.is_file():
        path = book.root.joinpath(*parts, "__init__.py")
    if not path.is_file():
        return None
    return _bound_names(ast.parse(path.read_text(encoding="utf-8")))


def solution_problems(book: Book, chapter: Chapter) -> list[str]:
    """A static check of every worked solution with code, above all those the chapter does not run: each block must
    parse, each name it reads must be bound by the solution itself, an earlier solution, the chapter's code or Python,
    and each name it imports from the package must exist there. It catches a solution left behind by a renamed
    function or variable, and reads no file but the chapter's and the package's sources; solution_call_problems
    checks the calls against the package itself."""
    text = (book.root / chapter.source).read_text(encoding="utf-8")
    defined = set(dir(builtins)).union(*(_bound_names(tree) for tree in _code_trees(text)))
    problems = []
    for ex in exercises(text):  # a solution may build on an earlier one's (exercise 7: "train_mtp from exercise 1")
        for block in ex.code:
            where = f"{chapter.source}: the solution of exercise {ex.number}"
            try:
                tree = ast.parse(block)
            except SyntaxError as err:
                problems.append(f"{where} is not valid Python (line {err.lineno}: {err.msg})")
                continue
            defined |= _bound_names(tree)
            stray = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
                           - defined)
            if stray:
                problems.append(f"{where} reads {', '.join(stray)}, which neither it nor the chapter defines")
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = _module_names(book, node.module)
                    missing = [a.name for a in node.names if names is not None and a.name not in names]
                    if missing:
                        problems.append(f"{where} imports {', '.join(missing)} from {node.module}, which has no "
                                        f"such name")
    return problems


def _imported_objects(trees: Iterable[ast.AST]) -> dict[str, Any]:
    """The objects that the top-level imports of `trees` bind, imported for real; an import that fails is skipped."""
    namespace: dict[str, Any] = {}
    for tree in trees:
        for node in getattr(tree, "body", []):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                try:
                    exec(compile(ast.Module(body=[node], type_ignores=[]), "<imports>", "exec"), namespace)
                except Exception:  # noqa: BLE001 - an optional package; the chapter's own run reports it
                    continue
    namespace.pop("__builtins__", None)
    return namespace


def _call_problem(fn: Any, call: ast.Call) -> str | None:
    """What is wrong with calling fn as `call` does (a keyword it has no parameter for, too many positional
    arguments), judged on its signature alone; None when the call fits or the signature cannot be read."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        accepted = {name for name, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = [kw.arg for kw in call.keywords if kw.arg is not None and kw.arg not in accepted]
        if unknown:
            return f"passes {', '.join(unknown)}, which it has no parameter for"
    starred = any(isinstance(a, ast.Starred) for a in call.args)
    if inspect.Parameter.VAR_POSITIONAL not in kinds and not starred:
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in sig.parameters.values())
        if len(call.args) > positional:
            return f"passes {len(call.args)} positional arguments, and it takes at most {positional}"
    return None


def solution_call_problems(book: Book, chapter: Chapter) -> list[str]:
    """The worked solutions' calls checked against the package itself (so it imports what the chapter imports): a
    call of an imported function or class, or of a module's attribute (`capstone.run`), whose keywords or number of
    positional arguments its signature refuses, and an attribute a module lacks. Names that the chapter or the
    solution rebinds are left alone. For the solutions a chapter does not run, this is the nearest check to running
    them."""
    text = (book.root / chapter.source).read_text(encoding="utf-8")
    cells = _code_trees(text)
    rebound = set().union(*(_bound_names(tree, imports=False) for tree in cells))
    chapter_objects = _imported_objects(cells)  # once: each solution adds only its own imports
    problems = []
    for ex in exercises(text):
        for block in ex.code:
            try:
                tree = ast.parse(block)
            except SyntaxError:
                continue  # solution_problems names it
            where = f"{chapter.source}: the solution of exercise {ex.number}"
            skip = rebound | _bound_names(tree, imports=False)
            objects = {k: v for k, v in {**chapter_objects, **_imported_objects([tree])}.items() if k not in skip}
            for node in ast.walk(tree):
                target, label = None, None
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                        and inspect.ismodule(objects.get(node.value.id)):
                    module = objects[node.value.id]
                    if not hasattr(module, node.attr):
                        problems.append(f"{where} reads {node.value.id}.{node.attr}, which {module.__name__} lacks")
                    continue
                if not isinstance(node, ast.Call):
                    continue
                if isinstance(node.func, ast.Name) and node.func.id in objects:
                    target, label = objects[node.func.id], node.func.id
                elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                        and inspect.ismodule(objects.get(node.func.value.id)):
                    target = getattr(objects[node.func.value.id], node.func.attr, None)
                    label = f"{node.func.value.id}.{node.func.attr}"
                if target is not None and callable(target):
                    wrong = _call_problem(target, node)
                    if wrong:
                        problems.append(f"{where} calls {label} (line {node.lineno}) and {wrong}")
    return problems


@dataclass(frozen=True)
class Reading:
    """A chapter held to the reader's standard (README, "Writing a chapter"): prose and code non-blank lines (the
    jupytext header excluded), the longest code cell and the line of its `# %%` marker, the diagrams (functions
    named `draw_*` that a chapter defines, and images it embeds from assets/), and its exercises: how many, those
    without a difficulty, a hint or a solution, how many solutions have code and which of those the chapter runs
    (`run_solutions`)."""

    chapter: str
    prose_lines: int
    code_lines: int
    longest_cell: int
    longest_at: int
    diagrams: int
    exercises: int = 0
    incomplete: tuple[int, ...] = ()
    code_solutions: int = 0
    solutions_run: tuple[int, ...] = ()

    @property
    def prose_share(self) -> float:
        total = self.prose_lines + self.code_lines
        return self.prose_lines / total if total else 0.0

    def problems(self) -> list[str]:
        out = []
        if self.prose_share < PROSE_SHARE_MIN:
            out.append(f"prose is {self.prose_share:.0%} of the non-blank lines (at least {PROSE_SHARE_MIN:.0%})")
        if self.longest_cell > CODE_CELL_MAX:
            out.append(f"the code cell at line {self.longest_at} has {self.longest_cell} non-blank lines (at most "
                       f"{CODE_CELL_MAX})")
        if self.diagrams < 1:
            out.append("no diagram (a draw_* function or an embedded image)")
        if self.incomplete:
            out.append(f"exercises {', '.join(map(str, self.incomplete))} lack a difficulty, a hint or a solution")
        return out


def reading(text: str, chapter: str = "") -> Reading:
    """Measure a chapter's percent-format source against the reader's standard."""
    prose = code = diagrams = 0
    longest, at = 0, 0
    for cell in parse_cells(text):
        lines = [line for line in cell.lines if line.strip()]
        if cell.line == 1 and cell.kind == "code" and all(line.startswith("#") for line in lines):
            continue  # the jupytext header (front matter before the first real cell)
        diagrams += sum(bool(_DIAGRAM_RE.search(line)) for line in lines)
        if cell.kind == "markdown":
            prose += len(lines)
        elif cell.kind == "code":
            code += len(lines)
            if len(lines) > longest:
                longest, at = len(lines), cell.line
    found = exercises(text)
    incomplete = tuple(e.number for e in found if not (e.stars and e.has_hint and e.has_solution))
    run = tuple(sorted({int(n) for m in _RUN_SOLUTIONS_RE.finditer(text) if m.group(1) == chapter or not chapter
                        for n in m.group(2).replace(",", " ").split()}))
    return Reading(chapter, prose, code, longest, at, diagrams, len(found), incomplete,
                   sum(bool(e.code) for e in found), run)


def chapter_readings(root: Path | str | None = None) -> list[Reading]:
    """Every chapter's Reading, in book order."""
    book = load_book(root)
    return [reading((book.root / c.source).read_text(encoding="utf-8"), c.number) for c in book.chapters]


# --------------------------------------------------------------------------------------------------------------------
# Running chapters


@dataclass(frozen=True)
class RunResult:
    """How one chapter's run went: its time, its status ("ok", "over budget" or "FAILED: ...") and the executed
    notebook's path."""

    chapter: Chapter
    seconds: float
    status: str
    output: Path

    @property
    def failed(self) -> bool:
        """True when the chapter raised, timed out or could not be run."""
        return self.status.startswith("FAILED")


def _first_line(err: BaseException) -> str:
    """A one-line summary of an exception; for a failed cell, the error the cell raised."""
    ename, evalue = getattr(err, "ename", None), getattr(err, "evalue", None)
    if ename:
        text = f"{ename}: {evalue}" if evalue else str(ename)
    else:
        text = str(err)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(err).__name__


def run_chapters(
    numbers: Sequence[str] | None = None,
    scale: str | None = None,
    timeout: int | None = DEFAULT_TIMEOUT_S,
    root: Path | str | None = None,
    echo: Callable[[str], None] = print,
) -> list[RunResult]:
    """Execute chapters' notebooks, in order, and time each against its budget.

    numbers: chapter numbers ("00"); all chapters when None or empty.
    scale: "small" or "full"; default `dslib.scale()`.
    timeout: seconds each cell may run (None: no limit).
    Each notebook runs with nbclient in a "python3" kernel of the current Python, in the notebook's folder, with
    DSLIB_STATIC=1, DSLIB_SCALE, DSLIB_ROOT and DSLIB_BUILD set and the root first on PYTHONPATH, so the chapter
    imports this checkout's dslib. The executed notebook (failed or not) is written to <build>/notebooks/.
    `echo` reports progress, a line as each chapter starts.
    """
    import nbformat
    from nbclient import NotebookClient

    from dslib import SCALES
    from dslib import scale as current_scale

    book = load_book(root)
    chapters = [book.chapter(n) for n in numbers] if numbers else list(book.chapters)
    scale = scale or current_scale()
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    out_dir = build_dir(book.root) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        DSLIB_STATIC="1",
        DSLIB_SCALE=scale,
        DSLIB_ROOT=str(book.root),
        DSLIB_BUILD=str(build_dir(book.root)),
        PYTHONPATH=os.pathsep.join(p for p in (str(book.root), env.get("PYTHONPATH", "")) if p),
    )
    results = []
    for i, chapter in enumerate(chapters, start=1):
        path = book.root / chapter.notebook
        output = out_dir / path.name
        echo(f"[{i}/{len(chapters)}] chapter {chapter.number}: {chapter.notebook} at scale {scale} ...")
        if not path.is_file():
            results.append(RunResult(chapter, 0.0, f"FAILED: {chapter.notebook} does not exist", output))
            continue
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        )
        start = time.perf_counter()
        try:
            client.execute(env=env)
        except Exception as err:  # a failing chapter is reported, and the others still run
            status = f"FAILED: {_first_line(err)}"
        else:
            status = "ok"
        seconds = time.perf_counter() - start
        if status == "ok" and seconds > chapter.budget_s:
            status = "over budget"
        nbformat.write(nb, output)
        echo(f"    {status} in {seconds:.1f} s")
        results.append(RunResult(chapter, seconds, status, output))
    return results


# --------------------------------------------------------------------------------------------------------------------
# The claims ledger

_HOLDS_TEXT = {True: "yes", False: "no", None: "n/a"}
_HOLDS_MARK = {True: "\u2713", False: "\u2717", None: "\u2013"}
_LEDGER_HEADERS = ("claim", "paper", "ours", "holds", "note")


class Ledger:
    """A chapter's claims ledger: each of the paper's claims next to what the chapter measured, and whether the
    miniature reproduces it (DESIGN.md, "A chapter, from top to bottom", step 7).

        ledger = Ledger("05")
        ledger.add("GRPO needs no value model", paper="no critic", ours="no critic", holds=True)
        ledger.add("AIME pass@1 rises to 71.0%", paper="71.0%", ours="n/a at this size", holds=None,
                   note="our world has no AIME")
        ledger.show()
        ledger.save()   # _build/ledger/05.json, read by `python -m dslib.book ledger`
    """

    def __init__(self, chapter: str) -> None:
        if not isinstance(chapter, str) or not re.fullmatch(r"[0-9A-Za-z_-]+", chapter):
            raise ValueError(f"chapter must be a chapter number like \"00\", got {chapter!r}")
        self.chapter = chapter
        self.rows: list[dict[str, Any]] = []

    def add(self, claim: str, paper: str, ours: str, holds: bool | None, note: str = "") -> None:
        """Record one claim. paper, ours: what the paper reports and what we measured, as display strings.
        holds: True (reproduced), False (not reproduced; say why in the note) or None (not comparable)."""
        for name, value in (("claim", claim), ("paper", paper), ("ours", ours), ("note", note)):
            if not isinstance(value, str):
                raise TypeError(f"Ledger.add: {name} must be a str (format numbers yourself), got {value!r}")
        if not claim.strip():
            raise ValueError("Ledger.add: claim must not be empty")
        if holds is not None and not isinstance(holds, bool):
            raise TypeError(f"Ledger.add: holds must be True, False or None (not comparable), got {holds!r}")
        self.rows.append({"claim": claim, "paper": paper, "ours": ours, "holds": holds, "note": note})

    def text(self) -> str:
        """The ledger as a plain-text table."""
        return format_table(
            _LEDGER_HEADERS,
            [(r["claim"], r["paper"], r["ours"], _HOLDS_TEXT[r["holds"]], r["note"]) for r in self.rows],
        )

    def html(self) -> str:
        """The ledger as an HTML table, with a \u2713 / \u2717 / \u2013 column."""
        head = "".join(f"<th>{h}</th>" for h in _LEDGER_HEADERS)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(_HOLDS_MARK[r['holds']] if key == 'holds' else r[key])}</td>"
                for key in _LEDGER_HEADERS
            )
            + "</tr>"
            for r in self.rows
        )
        caption = f"<caption>Claims ledger, chapter {html.escape(self.chapter)}</caption>"
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def show(self) -> None:
        """Display the ledger: an HTML table in a notebook, a text table elsewhere."""
        from dslib.explore import in_kernel

        if in_kernel():
            from IPython.display import display

            display({"text/html": self.html(), "text/plain": self.text()}, raw=True)
        else:
            print(self.text())

    def save(self, root: Path | str | None = None) -> Path:
        """Write the ledger to <build>/ledger/<chapter>.json (build: `DSLIB_BUILD`, or _build under the root, or under
        the current folder outside the repository); return the path."""
        folder = build_dir(Path(root) if root is not None else None) / "ledger"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.chapter}.json"
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps({"chapter": self.chapter, "rows": self.rows}, indent=2, ensure_ascii=False)
                             + "\n", encoding="utf-8")
        temporary.replace(path)
        return path


def read_ledgers(root: Path | str | None = None) -> list[dict[str, Any]]:
    """Every saved ledger, {"chapter": ..., "rows": [...]}, in order of chapter."""
    folder = build_dir(Path(root) if root is not None else None) / "ledger"
    ledgers = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as err:
            raise BookError(f"{path.name} in {folder} is not a readable ledger: {err}") from None
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise BookError(f"{path.name} in {folder} is not a ledger (no 'rows' list)")
        ledgers.append({"chapter": str(data.get("chapter", path.stem)), "rows": data["rows"]})
    return ledgers


# --------------------------------------------------------------------------------------------------------------------
# The command line


def _plural(n: int, word: str) -> str:
    """A count and a noun: 1 chapter, 3 modules."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _cmd_export(args: argparse.Namespace) -> int:
    book = load_book(args.root)
    chapters = [book.chapter(n) for n in args.chapters] if args.chapters else list(book.chapters)
    n_modules = sum(len(c.modules) for c in chapters)
    written = export(book.root, force=args.force, numbers=args.chapters)
    for path in written:
        print(f"wrote {_rel(book, path)}")
    print(f"book export: {_plural(n_modules, 'module')} from {_plural(len(chapters), 'chapter')}, "
          f"{len(written)} written, {n_modules - len(written)} unchanged")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve() if args.root else find_root()
    problems = check(root)
    for problem in problems:
        print(problem)
    if problems:
        print(f"book check: {_plural(len(problems), 'problem')}")
        return 1
    book = load_book(root)
    print(f"book check: {_plural(len(book.chapters), 'chapter')}, {_plural(len(book.modules), 'module')}, all in sync")
    return 0


def git_filter(root: Path | str | None = None) -> list[str]:
    """Set up nbstripout (a dev dependency) as this checkout's git filter for notebooks: `git add` then stores them
    without outputs or execution counts, keeping their cell ids (so a clean notebook is stored byte for byte as
    jupytext writes it), and `git diff` compares them without outputs. Local git configuration only (.git/config and
    .git/info/attributes); returns the settings made."""
    book = load_book(root)
    try:
        import nbstripout  # noqa: F401  (only to fail early with a clear message)
    except ImportError:
        raise BookError("nbstripout is not installed: pip install -e '.[dev]' (or pip install nbstripout)") from None

    def git(*argv: str) -> str:
        done = subprocess.run(["git", "-C", str(book.root), *argv], capture_output=True, text=True)
        if done.returncode != 0:
            raise BookError(f"git {' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout.strip()

    try:
        git_dir = Path(git("rev-parse", "--absolute-git-dir"))
    except (OSError, BookError) as err:
        raise BookError(f"{book.root} is not a git checkout (or git is missing): {err}") from None
    strip = f'"{sys.executable}" -m nbstripout --keep-id'
    settings = {"filter.nbstripout.clean": strip, "filter.nbstripout.smudge": "cat",
                "filter.nbstripout.required": "true", "diff.ipynb.textconv": f"{strip} -t"}
    for key, value in settings.items():
        git("config", "--local", key, value)
    attributes = git_dir / "info" / "attributes"
    attributes.parent.mkdir(parents=True, exist_ok=True)
    have = attributes.read_text(encoding="utf-8").splitlines() if attributes.is_file() else []
    lines = ["*.ipynb filter=nbstripout", "*.ipynb diff=ipynb"]
    missing = [line for line in lines if line not in have]
    if missing:
        attributes.write_text("\n".join(have + missing) + "\n", encoding="utf-8")
    return [f"{k} = {v}" for k, v in settings.items()] + [f"{attributes}: {line}" for line in lines]


def _cmd_git_filter(args: argparse.Namespace) -> int:
    for line in git_filter(args.root):
        print(line)
    print("book git-filter: `git add` now strips notebooks' outputs in this checkout")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    book = load_book(args.root)
    print(book.title)
    print()
    print(format_table(
        ("chapter", "title", "modules", "budget (s)", "papers"),
        [(c.number, c.title, ", ".join(c.modules), c.budget_s, "; ".join(c.papers)) for c in book.chapters],
    ))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    results = run_chapters(args.chapters, scale=args.scale, timeout=args.timeout, root=args.root)
    print()
    print(format_table(
        ("chapter", "seconds", "budget", "status"),
        [(r.chapter.number, round(r.seconds, 1), r.chapter.budget_s, r.status) for r in results],
    ))
    if results:
        print(f"executed notebooks: {results[0].output.parent}")
    return 1 if any(r.failed for r in results) else 0


def _cmd_ledger(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve() if args.root else None
    ledgers = read_ledgers(root)
    rows = [
        (ledger["chapter"], row.get("claim", ""), row.get("paper", ""), row.get("ours", ""),
         _HOLDS_TEXT.get(row.get("holds"), str(row.get("holds"))), row.get("note", ""))
        for ledger in ledgers
        for row in ledger["rows"]
    ]
    if not rows:
        folder = build_dir(root) / "ledger"
        print(f"No claims ledger has been written yet (none in {folder}): run the chapters first, "
              f"e.g. `python -m dslib.book run`.")
        return 0
    print(format_table(("chapter", *_LEDGER_HEADERS), rows))
    return 0


def _cmd_html(args: argparse.Namespace) -> int:
    from dslib.site import build_site

    site = build_site(args.root, out=args.out, notebooks=args.notebooks)
    executed = sum(p.executed for p in site.pages)
    print(f"book html: {_plural(len(site.pages), 'chapter page')} ({executed} with outputs), the index and the "
          f"claims ledger ({_plural(site.ledger_rows, 'claim')}) in {site.folder}")
    if executed < len(site.pages):
        print("chapters without outputs have not been run: `python -m dslib.book run` executes them")
    print(f"open {site.index}, or serve the folder: python -m http.server --directory {site.folder}")
    return 0


def _cmd_reading(args: argparse.Namespace) -> int:
    readings = chapter_readings(args.root)
    print(format_table(
        ("chapter", "prose %", "prose lines", "code lines", "longest code cell", "diagrams", "exercises",
         "code solutions", "run by the chapter", "below the standard"),
        [(r.chapter, round(100 * r.prose_share), r.prose_lines, r.code_lines, r.longest_cell, r.diagrams, r.exercises,
          r.code_solutions, ", ".join(map(str, r.solutions_run)) or "-", "; ".join(r.problems()))
         for r in readings],
    ))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dslib.book",
        description="The course tool: export chapters into dslib, check the book, list, run and report chapters, "
                    "build the site.",
    )
    parser.add_argument("--root", help="the folder holding book.toml (default: DSLIB_ROOT, or found from here)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cmd = commands.add_parser("export", help="write dslib's generated modules from the chapters")
    export_cmd.add_argument("chapters", nargs="*", metavar="CHAPTER", help="chapter numbers, e.g. 00 (default: all)")
    export_cmd.add_argument("--force", action="store_true", help="replace hand-written files that a chapter owns")
    export_cmd.set_defaults(handler=_cmd_export)
    commands.add_parser("check", help="fail when anything is out of sync").set_defaults(handler=_cmd_check)
    commands.add_parser("list", help="the chapters, their modules, budgets and papers").set_defaults(handler=_cmd_list)
    run_cmd = commands.add_parser("run", help="execute chapters' notebooks and time them against their budgets")
    run_cmd.add_argument("chapters", nargs="*", metavar="CHAPTER", help="chapter numbers, e.g. 00 (default: all)")
    run_cmd.add_argument("--scale", choices=("small", "full"), help="default: dslib.scale()")
    run_cmd.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                         help=f"the most seconds one cell may run (default: {DEFAULT_TIMEOUT_S})")
    run_cmd.set_defaults(handler=_cmd_run)
    commands.add_parser("ledger", help="every chapter's saved claims ledger").set_defaults(handler=_cmd_ledger)
    commands.add_parser("reading", help="each chapter against the reader's standard: prose share, longest code "
                                        "cell, diagrams").set_defaults(handler=_cmd_reading)
    html_cmd = commands.add_parser("html", help="the course as a static site: chapter pages with their outputs, the "
                                                "chapter map and the claims ledger")
    html_cmd.add_argument("--out", metavar="DIR", help="the site's folder (default: <build>/html; it is replaced)")
    html_cmd.add_argument("--notebooks", metavar="DIR",
                          help="the executed notebooks (default: <build>/notebooks, written by `run`)")
    html_cmd.set_defaults(handler=_cmd_html)
    commands.add_parser("git-filter", help="once per clone: git add strips notebooks' outputs (nbstripout)") \
        .set_defaults(handler=_cmd_git_filter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 problems found or a chapter failed, 2 an error)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
