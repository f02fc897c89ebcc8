"""The course's static site (`python -m dslib.book html`, dslib.site): built from a run of a real chapter and the
committed notebooks of the others, then read in headless Chromium as a reader would: every page loads with no console
error or failed request, every figure has a size, every equation is typeset (offline), every internal link resolves.
A small stand-in book checks the glue on its own: folded cells, link rewriting, the ledger page, bad input."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
from pathlib import Path
from unittest import mock
from urllib.parse import unquote, urlparse

import nbformat
import pytest

from browser import PageWatch, chromium, serve
from dslib.book import BookError, build_dir, find_root, load_book, run_chapters
from dslib.site import build_site, page_name

ROOT = find_root(Path(__file__))
# The chapter that the site test executes: the quickest one with figures, equations, an explorer and a ledger.
EXECUTED = "01"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The whole course's site, with chapter EXECUTED run (in a build folder of its own) and the others as
    committed."""
    build = tmp_path_factory.mktemp("site-build")
    with mock.patch.dict(os.environ, {"DSLIB_BUILD": str(build)}):
        start = time.perf_counter()
        (result,) = run_chapters([EXECUTED], scale="small", root=ROOT, echo=lambda line: None)
        assert not result.failed, f"chapter {EXECUTED} failed: {result.status}"
        print(f"chapter {EXECUTED} ran in {time.perf_counter() - start:.0f} s")
        lines = []
        built = build_site(ROOT, out=build / "html", echo=lines.append)
    return built, build, lines


def test_site_holds_every_chapter_the_index_and_the_ledger(site):
    built, build, lines = site
    book = load_book(ROOT)
    assert [p.chapter.number for p in built.pages] == [c.number for c in book.chapters]
    assert [p.executed for p in built.pages] == [c.number == EXECUTED for c in book.chapters]
    assert built.offline_math, "django-static-mathjax is a dev dependency: the site should serve MathJax itself"
    assert (built.folder / "_static" / "mathjax" / "tex-svg-full.js").is_file()
    index = built.index.read_text(encoding="utf-8")
    for page in built.pages:
        text = (built.folder / page.name).read_text(encoding="utf-8")
        assert f'href="{page.name}"' in index
        # Offline: nothing is loaded from the network, and no link points at a notebook file that the site lacks.
        assert not re.search(r'\bsrc="https?://', text), page.name
        assert not re.search(r'href="(?!https?:)[^"]*\.ipynb', text), page.name
        assert ("has not been run in this build" in text) == (not page.executed)
    executed = (built.folder / page_name(book.chapter(EXECUTED))).read_text(encoding="utf-8")
    assert executed.count('src="data:image/png;base64,') >= 3, "the executed chapter's figures are in its page"
    saved = json.loads((build / "ledger" / f"{EXECUTED}.json").read_text(encoding="utf-8"))
    assert built.ledger_rows == len(saved["rows"]) > 0
    ledger = (built.folder / "ledger.html").read_text(encoding="utf-8")
    for row in saved["rows"]:
        assert html.escape(row["claim"]) in ledger
    assert any("executed" in line for line in lines) and any("not run" in line for line in lines)


def _anchors(html_text: str) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', html_text)) | set(re.findall(r'\bname="([^"]+)"', html_text))


def test_every_page_renders_in_chromium_with_figures_equations_and_links(site):
    built, _, _ = site
    names = ["index.html", "ledger.html", *(p.name for p in built.pages)]
    executed_page = next(p.name for p in built.pages if p.executed)
    anchors = {name: _anchors((built.folder / name).read_text(encoding="utf-8")) for name in names}
    with_tex = {p.name: any(re.search(r"\$[^$\n]+\$", c.source) for c in nbformat.read(p.notebook, 4).cells
                            if c.cell_type == "markdown") for p in built.pages}
    assert sum(with_tex.values()) >= len(built.pages) // 2
    report = {}
    with serve(built.folder) as base, chromium() as browser:
        for name in names:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            watch = PageWatch(page)
            page.goto(base + name, wait_until="load")
            has_math = page.evaluate("() => !!(window.MathJax && MathJax.startup)")
            math = errors = 0
            if name not in ("index.html", "ledger.html"):
                assert has_math, f"{name}: MathJax did not load"
            if has_math:
                math, errors = page.evaluate("""() => MathJax.startup.promise.then(() => [
                    document.querySelectorAll('mjx-container').length,
                    document.querySelectorAll('mjx-merror, [data-mjx-error]').length])""")
            markdown = page.evaluate("() => Array.from(document.querySelectorAll('.jp-RenderedMarkdown'))"
                                     ".map(e => e.innerText).join('\\n')")
            images = page.evaluate("() => Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight,"
                                   " i.src.slice(0, 60)])")
            links = page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
            assert not watch.problems, f"{name}: {watch.problems[:5]}"
            assert errors == 0, f"{name}: {errors} equations failed to typeset"
            raw = re.findall(r".{0,30}\$[^$\n]{1,40}\$.{0,10}", markdown)
            assert not raw, f"{name}: TeX left untypeset: {raw[:3]}"
            if with_tex.get(name):
                assert math > 0, f"{name}: its Markdown has TeX, and no equation was typeset"
            for width, height, src in images:
                assert width > 0 and height > 0, f"{name}: an image did not render: {src}"
            for link in links:
                target = urlparse(link)
                if not link.startswith(base):
                    assert target.scheme in ("https", "http", "mailto"), f"{name}: odd link {link}"
                    assert target.hostname not in ("127.0.0.1", "localhost"), f"{name}: link to a local server {link}"
                    continue
                path = unquote(target.path[len(urlparse(base).path):]) or "index.html"
                assert path in anchors, f"{name}: link to {path}, which the site does not have"
                if target.fragment:
                    # a browser finds an anchor by the fragment as written or percent-decoded
                    found = {target.fragment, unquote(target.fragment)} & anchors[path]
                    assert found, f"{name}: no anchor #{target.fragment} in {path}"
            report[name] = (math, len(images), len(links))
            if name == executed_page:
                shots = build_dir(ROOT) / "screenshots"
                shots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(shots / f"site-{Path(name).stem}.png"))
            page.close()
    executed = report[executed_page]
    assert executed[1] >= 3, f"the executed chapter shows {executed[1]} images"


# --------------------------------------------------------------------------------------------------------------------
# The glue, on a stand-in book of one chapter

def _tiny_book(root: Path) -> None:
    (root / "chapters").mkdir(parents=True)
    (root / "book.toml").write_text(
        '[book]\ntitle = "Tiny"\npackage = "tiny"\nrepository = "https://example.org/tiny"\n\n'
        '[[chapter]]\nnumber = "00"\ntitle = "One: the only chapter"\nnotebook = "chapters/00_one.ipynb"\n'
        'source = "chapters/00_one.py"\nmodules = []\npapers = ["A paper"]\nbudget_s = 10\n', encoding="utf-8")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# One\n\nSee [itself](00_one.ipynb#One), [the source](00_one.py), "
                                      "[a data file](../assets/x.csv) and [the web](https://example.org/).\n\n$a^2$"),
        nbformat.v4.new_code_cell("print('folded plumbing')", metadata={"jupyter": {"source_hidden": True}}),
        nbformat.v4.new_code_cell("print('shown')"),
    ]
    nbformat.write(nb, root / "chapters" / "00_one.ipynb")


def test_folded_cells_stay_folded_and_links_lead_where_the_site_can(tmp_path):
    _tiny_book(tmp_path)
    built = build_site(tmp_path, out=tmp_path / "site", notebooks=tmp_path / "none", echo=lambda line: None)
    text = (tmp_path / "site" / "00_one.html").read_text(encoding="utf-8")
    folded = text[text.index('<details class="dslib-folded">'):]
    assert "folded plumbing" in folded[:folded.index("</details>")]
    assert "shown" in text and text.count('<details class="dslib-folded">') == 1
    assert 'href="00_one.html#One"' in text and text.count('href="00_one.html"') >= 1
    assert 'href="https://example.org/tiny/blob/main/assets/x.csv"' in text
    assert 'href="https://example.org/"' in text
    assert built.ledger_rows == 0
    assert "No chapter has saved its ledger yet" in (tmp_path / "site" / "ledger.html").read_text(encoding="utf-8")


def test_the_ledger_page_gathers_saved_ledgers(tmp_path, monkeypatch):
    from dslib.book import Ledger

    _tiny_book(tmp_path)
    monkeypatch.setenv("DSLIB_BUILD", str(tmp_path / "build"))
    ledger = Ledger("00")
    ledger.add("A <claim>", paper="1", ours="2", holds=False, note="off by one")
    ledger.add("Another", paper="x", ours="x", holds=True)
    ledger.save(tmp_path)
    built = build_site(tmp_path, echo=lambda line: None)
    assert built.folder == tmp_path / "build" / "html"
    text = (built.folder / "ledger.html").read_text(encoding="utf-8")
    assert built.ledger_rows == 2 and "A &lt;claim&gt;" in text and "off by one" in text
    assert "2 claims from 1 chapter: 1 reproduced" in text and "1 not reproduced" in text


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    _tiny_book(tmp_path)
    with pytest.raises(BookError, match="replace the course's own files"):
        build_site(tmp_path, out=tmp_path, echo=lambda line: None)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(BookError, match="not a site built before"):
        build_site(tmp_path, out=tmp_path / "notes", echo=lambda line: None)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    (tmp_path / "chapters" / "00_one.ipynb").unlink()
    with pytest.raises(BookError, match="chapter 00: neither"):
        build_site(tmp_path, out=tmp_path / "site", echo=lambda line: None)
    assert (tmp_path / "book.toml").is_file()


def test_the_command_line_builds_the_site(tmp_path, capsys):
    from dslib.book import main

    _tiny_book(tmp_path)
    assert main(["--root", str(tmp_path), "html", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 chapter page (0 with outputs)" in out and "have not been run" in out
    assert (tmp_path / "out" / "index.html").is_file()
    shutil.rmtree(tmp_path / "out")
