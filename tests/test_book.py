"""Tests of the course tool (dslib.book) and the explorers' static view (dslib.explore), on a small fake book."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jupytext
import pytest

from dslib import book
from dslib.book import BookError, Ledger, check, export, find_root, load_book, main
from dslib.explore import default_value, explore, start_value, static_mode

REPO = "https://github.com/example/demo-book"
REAL_ROOT = Path(__file__).resolve().parents[1]

MANIFEST = f"""\
[book]
title = "Demo Book"
package = "dslib"
repository = "{REPO}"

[[chapter]]
number = "07"
title = "A demo chapter"
notebook = "chapters/07_demo.ipynb"
source = "chapters/07_demo.py"
modules = ["alpha", "beta"]
papers = ["A Paper (arXiv 0000.00000)"]
budget_s = 60
"""

SOURCE = f"""\
# %% [markdown]
# # A demo chapter
#
# Install from {REPO} when dslib is missing.

# %%
#| default_exp alpha

# %%
#| export

def one() -> int:
    return 1


# %%
# a teaching step: not exported
scratch = one() + 1

# %%
#| export beta
from dslib.alpha import one

def two() -> int:
    return one() + 1

# %%
#|export
def three() -> int:
    return 3
"""

ALPHA = """\
# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/07_demo.py (chapter 07).
# Edit the chapter, then run the export again.

def one() -> int:
    return 1


def three() -> int:
    return 3
"""


def write_notebook(source: Path) -> Path:
    """Make the .ipynb from the .py the way `jupytext --sync` does with the project's jupytext.toml."""
    nb = jupytext.read(source)
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    path = source.with_suffix(".ipynb")
    jupytext.write(nb, path, fmt="ipynb")
    return path


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake book: book.toml, one chapter pair exporting two modules, an empty dslib/ folder."""
    (tmp_path / "book.toml").write_text(MANIFEST)
    (tmp_path / "chapters").mkdir()
    (tmp_path / "dslib").mkdir()
    source = tmp_path / "chapters" / "07_demo.py"
    source.write_text(SOURCE)
    write_notebook(source)
    monkeypatch.setenv("DSLIB_ROOT", str(tmp_path))
    monkeypatch.delenv("DSLIB_BUILD", raising=False)
    return tmp_path


def test_find_root_and_load(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert find_root() == root
    monkeypatch.delenv("DSLIB_ROOT")
    assert find_root(root / "chapters") == root
    monkeypatch.chdir(root / "dslib")
    loaded = load_book()  # found from the current directory
    assert loaded.root == root and loaded.repository == REPO
    assert loaded.chapter("07").modules == ("alpha", "beta")
    with pytest.raises(BookError, match="no chapter '99'"):
        loaded.chapter("99")


def test_export_writes_modules(root: Path) -> None:
    written = export(root)
    assert sorted(p.name for p in written) == ["alpha.py", "beta.py"]
    assert (root / "dslib" / "alpha.py").read_text() == ALPHA
    beta = (root / "dslib" / "beta.py").read_text()
    assert beta.endswith("from dslib.alpha import one\n\ndef two() -> int:\n    return one() + 1\n")
    assert "#| export" not in beta and "scratch" not in beta
    assert export(root) == []  # a second export changes nothing


def test_export_named_chapters_only(root: Path) -> None:
    with (root / "book.toml").open("a") as f:  # a second chapter whose source is not written yet
        f.write('\n[[chapter]]\nnumber = "08"\ntitle = "Later"\nnotebook = "chapters/08_later.ipynb"\n'
                'source = "chapters/08_later.py"\nmodules = ["gamma"]\npapers = []\nbudget_s = 60\n')
    with pytest.raises(BookError, match="08_later.py does not exist"):
        export(root)
    assert sorted(p.name for p in export(root, numbers=["07"])) == ["alpha.py", "beta.py"]
    with pytest.raises(BookError, match="no chapter '09'"):
        export(root, numbers=["09"])


def test_check_passes_after_export(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert check(root) != []  # nothing exported yet
    export(root)
    assert check(root) == []
    assert main(["check"]) == 0
    assert "book check: 1 chapter, 2 modules, all in sync" in capsys.readouterr().out


def test_check_fails_on_hand_edited_module(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export(root)
    path = root / "dslib" / "beta.py"
    path.write_text(path.read_text() + "\nFOUR = 4\n")
    problems = check(root)
    assert len(problems) == 1
    assert "dslib/beta.py differs from what chapters/07_demo.py exports" in problems[0]
    assert main(["check"]) == 1
    assert "dslib/beta.py" in capsys.readouterr().out


def test_check_fails_when_pair_out_of_sync(root: Path) -> None:
    export(root)
    source = root / "chapters" / "07_demo.py"
    source.write_text(source.read_text() + "\n# %%\nprint('new cell')\n")
    problems = check(root)
    assert len(problems) == 1
    assert "chapters/07_demo.ipynb is out of sync with chapters/07_demo.py" in problems[0]
    write_notebook(source)
    assert check(root) == []


def test_pair_check_works_without_jupytext(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export(root)
    monkeypatch.setitem(sys.modules, "jupytext", None)  # `import jupytext` now raises ImportError
    assert check(root) == []
    source = root / "chapters" / "07_demo.py"
    source.write_text(source.read_text().replace("return one() + 1", "return one() + 2"))
    problems = check(root)
    assert len(problems) == 2  # the pair and the generated module beta.py
    assert any("chapters/07_demo.ipynb is out of sync with chapters/07_demo.py" in p for p in problems)


def test_check_fails_when_notebook_has_outputs(root: Path) -> None:
    export(root)
    path = root / "chapters" / "07_demo.ipynb"
    nb = json.loads(path.read_text())
    code = next(cell for cell in nb["cells"] if cell["cell_type"] == "code")
    code["execution_count"] = 1
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi\n"}]
    path.write_text(json.dumps(nb))
    problems = check(root)
    assert len(problems) == 1 and "chapters/07_demo.ipynb stores outputs" in problems[0]


def _git(root: Path, *argv: str) -> str:
    done = subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *argv],
                          capture_output=True, text=True, check=True)
    return done.stdout


def _with_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    code = next(cell for cell in nb["cells"] if cell["cell_type"] == "code")
    code["execution_count"] = 1
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi\n"}]
    path.write_text(json.dumps(nb, indent=1))


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@needs_git
def test_check_judges_the_staged_notebook_in_a_git_checkout(root: Path) -> None:
    """A reader who runs a chapter (outputs saved in the working copy) breaks nothing; staging the outputs does."""
    export(root)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "clean")
    path = root / "chapters" / "07_demo.ipynb"
    _with_outputs(path)
    assert check(root) == []
    _git(root, "add", str(path))
    problems = check(root)
    assert len(problems) == 1 and "chapters/07_demo.ipynb as staged for commit stores outputs" in problems[0]
    assert "git-filter" in problems[0]


@needs_git
def test_git_filter_strips_outputs_on_add_and_keeps_clean_notebooks_byte_for_byte(root: Path) -> None:
    pytest.importorskip("nbstripout")
    from dslib.book import git_filter

    export(root)
    _git(root, "init", "-q")
    path = root / "chapters" / "07_demo.ipynb"
    clean = path.read_bytes()
    settings = git_filter(root)
    assert any("--keep-id" in line for line in settings)
    assert "nbstripout --keep-id" in _git(root, "config", "--get", "filter.nbstripout.clean")
    _git(root, "add", "-A")
    assert _git(root, "show", ":chapters/07_demo.ipynb").encode() == clean  # a clean notebook passes unchanged
    _with_outputs(path)
    _git(root, "add", str(path))
    staged = json.loads(_git(root, "show", ":chapters/07_demo.ipynb"))
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in staged["cells"] if c["cell_type"] == "code")
    assert check(root) == []
    git_filter(root)  # twice: the attributes are not repeated
    attributes = (root / ".git" / "info" / "attributes").read_text().splitlines()
    assert attributes.count("*.ipynb filter=nbstripout") == 1


def test_git_filter_outside_a_checkout_is_a_clear_error(root: Path) -> None:
    pytest.importorskip("nbstripout")
    from dslib.book import BookError, git_filter

    with pytest.raises(BookError, match="not a git checkout"):
        git_filter(root)


def test_check_fails_when_module_has_two_owners(root: Path) -> None:
    export(root)
    second = MANIFEST.split("[[chapter]]")[1].replace('"07"', '"08"').replace('["alpha", "beta"]', '["gamma", "beta"]')
    (root / "book.toml").write_text(MANIFEST + "\n[[chapter]]" + second)
    problems = check(root)
    assert problems == [
        "book.toml: field 'modules': module 'beta' has two owners: chapter 07 and chapter 08"
    ]
    with pytest.raises(BookError, match="two owners"):
        load_book(root)


def test_check_fails_on_missing_file(root: Path) -> None:
    export(root)
    (root / "book.toml").write_text(MANIFEST.replace("chapters/07_demo.ipynb", "chapters/07_gone.ipynb"))
    problems = check(root)
    assert problems == ["book.toml: chapter 07's notebook chapters/07_gone.ipynb does not exist"]


def test_check_fails_without_repository_address(root: Path) -> None:
    export(root)
    (root / "book.toml").write_text(MANIFEST.replace(REPO, "https://github.com/example/elsewhere"))
    problems = check(root)
    assert len(problems) == 1 and "chapters/07_demo.py does not contain the repository address" in problems[0]


def test_check_fails_on_orphaned_generated_module(root: Path) -> None:
    export(root)
    (root / "dslib" / "old.py").write_text("# GENERATED FILE: do not edit.\nX = 1\n")
    (root / "dslib" / "plumbing.py").write_text('"""Hand-written."""\n')
    problems = check(root)
    assert len(problems) == 1 and problems[0].startswith("dslib/old.py is a generated module that no chapter owns")


def test_export_to_unowned_module_is_an_error(root: Path) -> None:
    source = root / "chapters" / "07_demo.py"
    text = source.read_text().replace("#| export beta", "#| export gamma")
    source.write_text(text)
    line = text.splitlines().index("#| export gamma") + 1
    with pytest.raises(BookError, match=rf"chapters/07_demo.py, line {line}: .*'gamma'.* does not own"):
        export(root)
    assert not (root / "dslib" / "alpha.py").exists()  # nothing is written when any chapter fails


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("#| default_exp alpha", "# no default", "without a module name, and the chapter has no `#| default_exp`"),
        ("#| export beta", "# not exported", "owns module 'beta' in book.toml, but no `#| export` cell"),
    ],
)
def test_export_directive_errors(root: Path, old: str, new: str, message: str) -> None:
    source = root / "chapters" / "07_demo.py"
    source.write_text(source.read_text().replace(old, new))
    with pytest.raises(BookError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        export(root)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("budget_s = 60", 'budget_s = "60"', "budget_s"),
        ('number = "07"', "number = 7", "number"),
        ('papers = ["A Paper (arXiv 0000.00000)"]\n', "", "papers"),
    ],
)
def test_manifest_validation_names_the_field(root: Path, old: str, new: str, field: str) -> None:
    (root / "book.toml").write_text(MANIFEST.replace(old, new))
    with pytest.raises(BookError, match=rf"^book.toml: .*'{field}'"):
        load_book(root)


def test_export_keeps_hand_written_files(root: Path) -> None:
    (root / "dslib" / "alpha.py").write_text('"""Hand-written."""\n')
    with pytest.raises(BookError, match="hand-written"):
        export(root)
    export(root, force=True)
    assert (root / "dslib" / "alpha.py").read_text() == ALPHA


def test_ledger_save_and_print(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger"]) == 0
    assert "No claims ledger has been written yet" in capsys.readouterr().out
    ledger = Ledger("07")
    ledger.add("loss falls with compute", paper="power law", ours="power law, exponent 0.31", holds=True)
    ledger.add("AIME pass@1 71.0%", paper="71.0%", ours="-", holds=None, note="no AIME here")
    with pytest.raises(TypeError, match="holds"):
        ledger.add("x", paper="1", ours="2", holds="yes")  # type: ignore[arg-type]
    path = ledger.save()
    assert path == root / "_build" / "ledger" / "07.json"
    saved = json.loads(path.read_text())
    assert saved["chapter"] == "07" and saved["rows"] == ledger.rows
    assert saved["rows"][1] == {"claim": "AIME pass@1 71.0%", "paper": "71.0%", "ours": "-", "holds": None,
                                "note": "no AIME here"}
    assert main(["ledger"]) == 0
    out = capsys.readouterr().out
    assert "loss falls with compute" in out and "power law, exponent 0.31" in out and "no AIME here" in out
    assert "\u2713" in ledger.html() and "\u2013" in ledger.html()


def test_ledger_outside_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSLIB_ROOT", raising=False)
    monkeypatch.delenv("DSLIB_BUILD", raising=False)
    monkeypatch.chdir(tmp_path)
    ledger = Ledger("03")
    ledger.add("a claim", paper="1", ours="1", holds=True)
    assert ledger.save() == tmp_path / "_build" / "ledger" / "03.json"


def test_list_prints_the_chapter(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "07" in out and "A demo chapter" in out and "alpha, beta" in out and "60" in out
    assert "A Paper (arXiv 0000.00000)" in out


def test_format_table() -> None:
    text = book.format_table(("name", "n"), [("a", 1), ("bbb", 22)])
    assert text.splitlines() == ["name   n", "----  --", "a      1", "bbb   22"]


def test_parse_cells_kinds_and_lines() -> None:
    text = textwrap.dedent("""\
        # ---
        # jupyter: {}
        # ---

        # %% [markdown]
        # hi
        # %%time is a magic, not a cell
        # %% A title
        x = 1
        # %% [raw]
        raw
        """)
    cells = book.parse_cells(text)
    assert [(c.kind, c.line) for c in cells] == [("markdown", 5), ("code", 8), ("raw", 10)]
    assert cells[0].lines == ("# hi", "# %%time is a magic, not a cell")


def test_explore_static_uses_defaults(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    monkeypatch.setenv("DSLIB_STATIC", "1")
    assert static_mode()
    calls = []

    def draw(**kwargs: object) -> str:
        calls.append(kwargs)
        return "drawn"

    slider = ipywidgets.FloatSlider(value=0.25, min=0.0, max=1.0)
    result = explore(draw, n=(0, 10), t=(0.0, 2.0), k=(1, 9, 3), mode=["dense", "moe"], grid=True, w=slider,
                     label="x")
    assert result == "drawn"
    assert calls == [{"n": 5, "t": 1.0, "k": 4, "mode": "dense", "grid": True, "w": 0.25, "label": "x"}]
    assert isinstance(calls[0]["n"], int)
    assert capsys.readouterr().out.startswith("Static view (no widget front end)")


@pytest.mark.parametrize("control", [(0, 10), (0, 9), (1, 9, 3), (0.0, 2.0), (-1.0, 1.0, 0.3), ["a", "b"], True])
def test_default_value_matches_interact(control: object) -> None:
    ipywidgets = pytest.importorskip("ipywidgets")
    widget = ipywidgets.interactive(lambda x: None, x=control).children[0]
    assert default_value(control) == widget.value


def test_static_view_starts_where_the_widgets_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipywidgets starts a control at the function's own default when the control can show it: so does the static
    view (a default outside the range, or not among the options, falls back to the control's default)."""
    ipywidgets = pytest.importorskip("ipywidgets")

    def draw(step=20, problem=0, scale=0.5, mode="moe", far=99, off=3, other="x", grid=False, text="zz"):
        return step, problem, scale, mode, far, off, other, grid, text

    controls = dict(step=(0, 40, 5), problem=(0, 99, 1), scale=(0.0, 2.0), mode=["dense", "moe"], far=(0, 10),
                    off=(0, 10, 4), other=["a", "b"], grid=True, text="y")
    shown = {c.description: c.value for c in ipywidgets.interactive(draw, **controls).children[:-1]}
    assert {name: start_value(draw, name, control) for name, control in controls.items()} == shown
    # The function's defaults win on sliders (clamped, not snapped) and dropdowns; the control's own value elsewhere.
    assert shown == dict(step=20, problem=0, scale=0.5, mode="moe", far=10, off=3, other="a", grid=True, text="y")
    monkeypatch.setenv("DSLIB_STATIC", "1")
    assert explore(draw, **controls) == tuple(shown.values())


def test_static_mode_outside_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSLIB_STATIC", raising=False)
    assert static_mode()  # pytest is not an IPython kernel
    monkeypatch.setenv("DSLIB_STATIC", "0")
    assert static_mode()


def _real_chapters_missing() -> bool:
    try:
        real = load_book(REAL_ROOT)
    except BookError:
        return True
    return not any((REAL_ROOT / chapter.source).is_file() for chapter in real.chapters)


@pytest.mark.skipif(_real_chapters_missing(), reason="no chapter of the real book has been written yet")
def test_real_book_is_in_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSLIB_ROOT", raising=False)
    assert check(find_root(REAL_ROOT)) == []


def test_run_executes_and_times_a_chapter(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("nbclient")
    (root / "book.toml").write_text(MANIFEST.replace("budget_s = 60", "budget_s = 1"))
    source = root / "chapters" / "07_demo.py"
    source.write_text("# %%\nimport os, time\ntime.sleep(1.1)\n"
                      "print(os.environ['DSLIB_STATIC'], os.environ['DSLIB_SCALE'], os.getcwd())\n")
    write_notebook(source)
    assert main(["run", "07", "--scale", "small", "--timeout", "60"]) == 0
    out = capsys.readouterr().out
    assert "[1/1] chapter 07" in out and "over budget" in out
    executed = json.loads((root / "_build" / "notebooks" / "07_demo.ipynb").read_text())
    printed = "".join(executed["cells"][-1]["outputs"][0]["text"])
    assert printed.strip() == f"1 small {root / 'chapters'}"


def test_reading_counts_prose_code_cells_and_diagrams():
    from dslib.book import reading

    src = ("# ---\n# jupyter:\n#   kernelspec: {}\n# ---\n\n# %% [markdown]\n# # Title\n#\n# Some prose.\n\n"
           "# %%\nimport numpy\n\n\ndef draw_thing():\n    pass\n\n# %% [markdown]\n# ![a figure](../assets/x.svg)\n"
           "\n# %%\n" + "x = 1\n" * 81)
    r = reading(src, "99")
    assert (r.prose_lines, r.code_lines, r.longest_cell, r.diagrams) == (4, 3 + 81, 81, 2)
    assert r.longest_at == 21 and round(r.prose_share, 3) == round(4 / 88, 3)
    problems = r.problems()
    assert any("prose" in p for p in problems) and any("81 non-blank lines" in p for p in problems)
    assert reading("# %% [markdown]\n# prose\n\n# %%\nx = 1\n").problems() == ["no diagram (a draw_* function or an "
                                                                               "embedded image)"]
    badge = ("# %% [markdown]\n# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://x)"
             "\n# [![Binder](https://mybinder.org/badge_logo.svg)](https://y)\n")
    assert reading(badge).diagrams == 0  # the badges are not diagrams


def test_every_chapter_meets_the_readers_standard():
    """Every chapter is written to the reader's standard (prose >= 30%, no code cell over 80 lines, a diagram, each
    exercise with a difficulty, a hint and a solution, and some solutions run by the chapter itself);
    `python -m dslib.book reading` prints each chapter's figures."""
    from dslib.book import chapter_readings

    readings = chapter_readings()
    assert [r.chapter for r in readings][:2] == ["00", "01"]
    for r in readings:
        assert r.problems() == [], (r.chapter, r.problems())
        assert r.solutions_run, f"chapter {r.chapter} runs none of its worked solutions (run_solutions)"


EXERCISES = '''# %% [markdown]
# ## Exercises
#
# 1. ★ **Add.** Add two numbers.
#
#    <details><summary>Hint</summary>Use +.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    total = a + 2
#    ```
#    </details>
#
# 2. ★★ **Prove.** A proof, no code, and no hint.
#
#    <details><summary>Solution</summary>By induction.</details>
#
# 3. **Fail.** No difficulty.
#
#    <details><summary>Hint</summary>None.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    raise ValueError("broken on purpose")
#    ```
#    </details>
#
# ## Checks

# %%
from dslib.book import run_solutions
run_solutions("07", globals(), (1,))
'''


def test_exercises_are_parsed_and_judged():
    from dslib.book import exercises, reading

    found = exercises(EXERCISES)
    assert [(e.number, e.stars, e.has_hint, e.has_solution) for e in found] == [(1, 1, True, True), (2, 2, False, True),
                                                                                (3, 0, True, True)]
    assert found[0].code == ("total = a + 2\n",) and found[1].code == ()
    r = reading(EXERCISES, "07")
    assert (r.exercises, r.code_solutions, r.incomplete, r.solutions_run) == (3, 2, (2, 3), (1,))
    assert "exercises 2, 3 lack a difficulty, a hint or a solution" in r.problems()


def test_run_solutions_runs_the_code_and_names_a_failing_exercise(root: Path) -> None:
    from dslib.book import BookError, run_solutions

    (root / "chapters" / "07_demo.py").write_text(EXERCISES)
    namespace = {"a": 40}
    seconds = run_solutions("07", namespace, (1,))
    assert namespace["total"] == 42 and set(seconds) == {1}
    with pytest.raises(RuntimeError, match="exercise 3 failed: ValueError: broken on purpose"):
        run_solutions("07", namespace, (3,))
    with pytest.raises(BookError, match="exercise 2 has no solution with Python code"):
        run_solutions("07", namespace, (2,))


def test_solution_problems_name_stray_names_and_missing_imports(root: Path) -> None:
    """The static check of worked solutions: names that nothing binds and imports the package lacks are named, with
    their exercise; names from the chapter's code, from an earlier solution or from Python are not."""
    from dslib.book import check, load_book, solution_problems

    export(root)  # dslib/alpha.py now defines one()
    chapter = SOURCE + '''
# %% [markdown]
# ## Exercises
#
# 1. ★ **Good.** Uses the chapter and Python.
#
#    <details><summary>Hint</summary>None.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    from dslib.alpha import one
#    kept = [scratch + one() + len(str(i)) for i in range(2)]
#    ```
#    </details>
#
# 2. ★ **Builds on 1.** Reads what exercise 1 bound.
#
#    <details><summary>Hint</summary>None.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    print(sum(kept))
#    ```
#    </details>
#
# 3. ★ **Stale.** A renamed variable and a function that is gone.
#
#    <details><summary>Hint</summary>None.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    from dslib.alpha import one, gone
#    print(scratch_old + one())
#    ```
#    </details>
#
# 4. ★ **Broken.** Not Python.
#
#    <details><summary>Hint</summary>None.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    print((
#    ```
#    </details>
'''
    source = root / "chapters" / "07_demo.py"
    source.write_text(chapter)
    write_notebook(source)
    book = load_book(root)
    found = solution_problems(book, book.chapter("07"))
    assert found[:2] == [
        "chapters/07_demo.py: the solution of exercise 3 reads scratch_old, which neither it nor the chapter defines",
        "chapters/07_demo.py: the solution of exercise 3 imports gone from dslib.alpha, which has no such name"]
    assert len(found) == 3 and found[2].startswith("chapters/07_demo.py: the solution of exercise 4 is not valid "
                                                   "Python (line 1: ")  # the message itself is Python's
    assert set(found) <= set(check(root))  # `python -m dslib.book check` reports them


def test_solution_call_problems_check_calls_against_the_package(root: Path) -> None:
    """Solutions' calls of imported functions and classes, and of modules' attributes, are checked against their
    signatures: an unknown keyword, too many positional arguments and a missing module attribute are named; calls
    that fit, and names the solution rebinds, are not."""
    from dslib.book import load_book, solution_call_problems

    def solution(n: int, code: str) -> str:
        body = "\n".join(f"#    {line}" for line in code.splitlines())
        return (f"# {n}. ★ **Call {n}.**\n#\n#    <details><summary>Hint</summary>None.</details>\n"
                f"#    <details><summary>Solution</summary>\n#\n#    ```python\n{body}\n#    ```\n#    </details>\n#\n")

    chapter = SOURCE + "\n# %%\nimport json\nfrom dslib.grpo import GRPOConfig\n\n# %% [markdown]\n# ## Exercises\n#\n"
    chapter += solution(1, "c = GRPOConfig(steps=3, seed=0)\nprint(json.dumps({}, indent=1))")
    chapter += solution(2, "c = GRPOConfig(stepz=3)\njson.dumps({}, 1, 2)\njson.dumpz({})")
    chapter += solution(3, "def GRPOConfig(**kw):\n    return kw\nGRPOConfig(anything=1)")
    source = root / "chapters" / "07_demo.py"
    source.write_text(chapter)
    book = load_book(root)
    found = solution_call_problems(book, book.chapter("07"))
    assert sorted(found) == sorted([
        "chapters/07_demo.py: the solution of exercise 2 calls GRPOConfig (line 1) and passes stepz, which it has no "
        "parameter for",
        "chapters/07_demo.py: the solution of exercise 2 calls json.dumps (line 2) and passes 3 positional arguments, "
        "and it takes at most 1",
        "chapters/07_demo.py: the solution of exercise 2 reads json.dumpz, which json lacks"])


def test_every_worked_solution_fits_the_package():
    """Every chapter's worked solutions, read against dslib itself: each call of an imported function or class fits
    its signature, each module attribute exists (the solutions that train are not run by the tests; this is what
    keeps them from going stale)."""
    from dslib.book import load_book, solution_call_problems

    book = load_book()
    assert [p for c in book.chapters for p in solution_call_problems(book, c)] == []
