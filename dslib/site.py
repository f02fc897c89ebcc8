"""The course as a static site: `python -m dslib.book html`.

Hand-written plumbing, like `dslib.book`; no chapter teaches it. The conversion itself is nbconvert's (its "lab"
template, which gives a page JupyterLab's look); this module is the glue around it:

- one page per chapter, from the executed notebook that `python -m dslib.book run` wrote to `<build>/notebooks/`, or,
  for a chapter that has not been run, from its committed notebook (code and prose, no outputs) with a banner that
  says so;
- a bar of links on every page (the index, the previous and next chapters, the claims ledger);
- an index with the chapter map, and a page that gathers every chapter's saved claims ledger into one table;
- links to another chapter's notebook lead to its page, links to other files of the repository to the repository;
- images in the Markdown cells are embedded, and equations are typeset by a copy of MathJax served with the site
  (MathJax 3's files, from the django-static-mathjax package), so the pages need no network.

    from dslib.site import build_site
    site = build_site()            # _build/html/index.html, one page per chapter, ledger.html
    print(site.index)
"""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dslib.book import Book, BookError, Chapter, build_dir, load_book, read_ledgers

__all__ = ["Page", "Site", "build_site", "page_name", "mathjax_folder", "CDN_MATHJAX"]

# Where the pages load MathJax from when no local copy is installed (then equations need a network).
CDN_MATHJAX = "https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-svg-full.js"
_MATHJAX_BUNDLE = "tex-svg-full.js"  # configured in the page (dslib/templates/dslib/index.html.j2)
_STATIC = "_static"
_TEMPLATES = Path(__file__).with_name("templates")
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

_CSS = """
.dslib-nav { display: flex; flex-wrap: wrap; gap: 0.4em 1.2em; align-items: baseline; padding: 0.6em 1em;
  margin: 0 0 1em 0; background: #f3f5f8; border-bottom: 1px solid #d6dbe3; font: 14px/1.4 system-ui, sans-serif; }
.dslib-nav a { color: #1f4e99; text-decoration: none; }
.dslib-nav a:hover { text-decoration: underline; }
.dslib-nav .dslib-spacer { flex: 1; }
.dslib-banner { margin: 0 1em 1em 1em; padding: 0.6em 1em; background: #fff6db; border: 1px solid #e8d48b;
  font: 14px/1.4 system-ui, sans-serif; }
.dslib-badge { display: inline-block; padding: 0.1em 0.6em; margin-right: 0.3em; border: 1px solid #1f4e99;
  border-radius: 3px; font: 13px/1.5 system-ui, sans-serif; }
details.dslib-folded > summary { cursor: pointer; color: #555; font: 13px/1.6 monospace; padding: 0.2em 0; }
.dslib-page { max-width: 72em; margin: 0 auto; padding: 0 1.5em 3em 1.5em; font: 15px/1.55 system-ui, sans-serif;
  color: #1b1b1b; }
.dslib-page table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
.dslib-page th, .dslib-page td { border: 1px solid #d6dbe3; padding: 0.35em 0.6em; text-align: left;
  vertical-align: top; }
.dslib-page th { background: #f3f5f8; }
.dslib-page td.holds { text-align: center; font-weight: bold; }
.dslib-page .yes { color: #1d7a35; } .dslib-page .no { color: #b3261e; } .dslib-page .na { color: #777; }
"""


@dataclass(frozen=True)
class Page:
    """One chapter's page: the chapter, the page's file name, and where its notebook came from (`executed`: from a
    run, with outputs; otherwise the committed notebook)."""

    chapter: Chapter
    name: str
    notebook: Path
    executed: bool


@dataclass(frozen=True)
class Site:
    """A built site: its folder, its chapter pages, whether equations are typeset offline (a local MathJax), and
    how many ledger rows the ledger page holds."""

    folder: Path
    pages: tuple[Page, ...]
    offline_math: bool
    ledger_rows: int

    @property
    def index(self) -> Path:
        """The site's front page."""
        return self.folder / "index.html"


def page_name(chapter: Chapter) -> str:
    """The file name of a chapter's page: its notebook's name with .html (00_foundations.html)."""
    return Path(chapter.notebook).with_suffix(".html").name


def mathjax_folder() -> Path | None:
    """The folder of a local MathJax 3 (its es5 components), from the django-static-mathjax package, which ships
    MathJax's release files as they are and needs nothing else (not Django); None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("mathjax")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "static" / "mathjax" / "es5"
        if (folder / _MATHJAX_BUNDLE).is_file():
            return folder
    return None


def _short(title: str) -> str:
    """A chapter's title up to its colon, for the bar of links ("Scaling laws")."""
    return title.split(":")[0].strip()


def _nav(book: Book, index: int | None, pages: Sequence[Page]) -> str:
    """The bar of links: the course, the previous and next chapters (on a chapter page), the ledger."""
    links = [f'<a href="index.html">{html.escape(book.title)}</a>']
    if index is not None:
        if index > 0:
            prev = pages[index - 1]
            links.append(f'<a href="{prev.name}" rel="prev">&larr; {prev.chapter.number} '
                         f'{html.escape(_short(prev.chapter.title))}</a>')
        links.append('<span class="dslib-spacer"></span>')
        if index + 1 < len(pages):
            nxt = pages[index + 1]
            links.append(f'<a href="{nxt.name}" rel="next">{nxt.chapter.number} '
                         f'{html.escape(_short(nxt.chapter.title))} &rarr;</a>')
    else:
        links.append('<span class="dslib-spacer"></span>')
    links.append('<a href="ledger.html">claims ledger</a>')
    return '<nav class="dslib-nav">' + "".join(links) + "</nav>"


def _clean_widgets(nb: Any) -> None:
    """Drop widget state and widget views that have a text alternative (progress bars): without a widget manager,
    which would come from the network, the page shows the text."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data and _WIDGET_VIEW in data and len(data) > 1:
                del data[_WIDGET_VIEW]


_HREF = re.compile(r'(?P<attr>\bhref=")(?P<url>[^"#]*)(?P<anchor>#[^"]*)?"')


def _rewrite_links(text: str, book: Book, source: Path, names: dict[str, str]) -> str:
    """Point relative links of a page where they lead on the site: a chapter's notebook (or .py source) to its page,
    another file of the repository to the repository's copy of it. External links, anchors and links into the site
    itself are left as they are."""
    repository = book.repository.rstrip("/")
    site_pages = {*names.values(), "index.html", "ledger.html"}

    def fix(match: re.Match[str]) -> str:
        url, anchor = match["url"], match["anchor"] or ""
        if not url or re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url) or url.startswith("/") or url in site_pages:
            return match[0]
        target = (source.parent / url).resolve()
        try:
            relative = target.relative_to(book.root.resolve()).as_posix()
        except ValueError:
            return match[0]
        if relative in names:
            return f'{match["attr"]}{names[relative]}{anchor}"'
        return f'{match["attr"]}{html.escape(repository)}/blob/main/{relative}{anchor}"'

    return _HREF.sub(fix, text)


_IMG = re.compile(r"<img\b[^>]*>")
_ATTR = re.compile(r'\b(src|alt)="([^"]*)"')


def _offline_images(text: str) -> str:
    """Replace images that would load from the network (the Colab and Binder badges) with their alt text, so that a
    page needs no network and its links still read well."""

    def fix(match: re.Match[str]) -> str:
        attrs = dict(_ATTR.findall(match[0]))
        if not re.match(r"^https?://", attrs.get("src", "")):
            return match[0]
        return f'<span class="dslib-badge">{attrs.get("alt") or "image"}</span>'

    return _IMG.sub(fix, text)


def _plain_page(title: str, nav: str, body: str) -> str:
    """A page of the site that is not a notebook (the index, the ledger)."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><link rel=\"icon\" href=\"data:,\"><style>{_CSS}</style></head>"
            f"<body>{nav}<main class=\"dslib-page\">{body}</main>{nav}</body></html>\n")


def _index_body(book: Book, pages: Sequence[Page], ledger_counts: dict[str, dict[Any, int]]) -> str:
    """The front page: the chapter map, with each chapter's papers, modules, budget and state."""
    rows = []
    for page in pages:
        c = page.chapter
        counts = ledger_counts.get(c.number)
        ledger = (f"{counts.get(True, 0)} of {sum(counts.values())} reproduced" if counts else "not saved yet")
        state = "executed: outputs shown" if page.executed else "not run yet: code and prose only"
        rows.append(
            f"<tr><td>{c.number}</td><td><a href=\"{page.name}\">{html.escape(c.title)}</a></td>"
            f"<td>{'<br>'.join(html.escape(p) for p in c.papers)}</td>"
            f"<td>{', '.join(f'<code>dslib.{html.escape(m)}</code>' for m in c.modules) or '&ndash;'}</td>"
            f"<td>{c.budget_s} s</td><td>{state}</td><td>{ledger}</td></tr>"
        )
    not_run = [p.chapter.number for p in pages if not p.executed]
    note = ""
    if not_run:
        note = (f"<p class=\"dslib-banner\">Chapters {', '.join(not_run)} have not been run in this build: their pages "
                f"show code and prose only. <code>python -m dslib.book run</code> executes every chapter, then "
                f"<code>python -m dslib.book html</code> rebuilds the site with their outputs.</p>")
    return (
        f"<h1>{html.escape(book.title)}</h1>"
        "<p>An interactive course that rebuilds the ideas of the DeepSeek papers in miniature: each chapter builds "
        "one piece of <code>dslib</code>, checks it against a slow reference, trains it on the course's arithmetic "
        "world, and compares what it measured with the paper's claims in its ledger. "
        "The pages show one run of the notebooks; open a notebook in Jupyter to change and rerun it.</p>"
        f"{note}<h2>Chapters</h2><table><thead><tr><th>#</th><th>chapter</th><th>papers</th><th>modules</th>"
        "<th>budget (small scale, 2 cores)</th><th>this build</th><th>claims ledger</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>"
        "<p>Every chapter's claims, side by side: <a href=\"ledger.html\">the claims ledger</a>.</p>"
    )


_HOLDS = {True: ("yes", "\u2713 reproduced"), False: ("no", "\u2717 not reproduced"), None: ("na", "\u2013 not comparable")}


def _ledger_body(ledgers: list[dict[str, Any]], names: dict[str, str]) -> tuple[str, int]:
    """The ledger page: one table of every saved claim, and the tally per chapter. Returns the body and the number
    of rows."""
    rows, total = [], 0
    for ledger in ledgers:
        chapter = html.escape(ledger["chapter"])
        link = names.get(ledger["chapter"])
        label = f'<a href="{link}">{chapter}</a>' if link else chapter
        for row in ledger["rows"]:
            cls, mark = _HOLDS.get(row.get("holds"), ("na", html.escape(str(row.get("holds")))))
            rows.append(
                f"<tr><td>{label}</td><td>{html.escape(str(row.get('claim', '')))}</td>"
                f"<td>{html.escape(str(row.get('paper', '')))}</td><td>{html.escape(str(row.get('ours', '')))}</td>"
                f"<td class=\"holds {cls}\">{mark}</td><td>{html.escape(str(row.get('note', '')))}</td></tr>"
            )
            total += 1
    if not rows:
        return ("<h1>Claims ledger</h1><p class=\"dslib-banner\">No chapter has saved its ledger yet: run the chapters "
                "(<code>python -m dslib.book run</code>), then rebuild the site.</p>"), 0
    tally = {key: sum(1 for lg in ledgers for r in lg["rows"] if r.get("holds") is key) for key in (True, False, None)}
    chapters = f"{len(ledgers)} chapter" + ("" if len(ledgers) == 1 else "s")
    summary = (f"<p>{total} claims from {chapters}: {tally[True]} reproduced by the miniature, "
               f"{tally[False]} not reproduced (the note says by how much and why), {tally[None]} not comparable at "
               f"this size. Each row is as the latest run of its chapter saved it.</p>")
    return ("<h1>Claims ledger</h1>" + summary +
            "<table><thead><tr><th>chapter</th><th>claim</th><th>paper</th><th>ours</th><th>holds</th><th>note</th>"
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"), total


def build_site(
    root: Path | str | None = None,
    out: Path | str | None = None,
    notebooks: Path | str | None = None,
    echo: Callable[[str], None] = print,
) -> Site:
    """Build the course's static site and return it.

    root: the repository (default: found from here). out: the site's folder (default `<build>/html`; it is replaced).
    notebooks: the folder of executed notebooks (default `<build>/notebooks`, where `python -m dslib.book run`
    writes them); a chapter missing there is shown from its committed notebook, without outputs.
    Equations are typeset by a local MathJax 3 copied into the site when django-static-mathjax is installed, else by
    MathJax from a CDN (`echo` says so). `echo` reports each page written.
    """
    import nbformat
    from nbconvert import HTMLExporter

    book = load_book(root)
    out_dir = Path(out) if out is not None else build_dir(book.root) / "html"
    executed_dir = Path(notebooks) if notebooks is not None else build_dir(book.root) / "notebooks"
    if out_dir.resolve() in (book.root.resolve(), (book.root / "chapters").resolve()):
        raise BookError(f"refusing to build the site into {out_dir}: it would replace the course's own files")
    if out_dir.exists():
        if any(out_dir.iterdir()) and not (out_dir / "index.html").is_file():
            raise BookError(f"refusing to replace {out_dir}: it is not a site built before (no index.html) and not "
                            f"empty; name another folder with --out")
        shutil.rmtree(out_dir)
    (out_dir / _STATIC).mkdir(parents=True)

    local = mathjax_folder()
    if local is not None:
        shutil.copytree(local, out_dir / _STATIC / "mathjax")
        mathjax_url = f"{_STATIC}/mathjax/{_MATHJAX_BUNDLE}"
    else:
        mathjax_url = CDN_MATHJAX
        echo("django-static-mathjax (MathJax's files) is not installed: equations load MathJax from a CDN and need a "
             "network (pip install django-static-mathjax, or pip install -e '.[dev]')")

    pages = []
    for chapter in book.chapters:
        executed = executed_dir / Path(chapter.notebook).name
        source = executed if executed.is_file() else book.root / chapter.notebook
        if not source.is_file():
            raise BookError(f"chapter {chapter.number}: neither {executed} nor {chapter.notebook} exists")
        pages.append(Page(chapter, page_name(chapter), source, source == executed))
    # Links from one chapter to another name its notebook or its .py source: both lead to its page.
    names = {}
    for page in pages:
        names[Path(page.chapter.notebook).as_posix()] = page.name
        names[Path(page.chapter.source).as_posix()] = page.name

    exporter = HTMLExporter(template_name="dslib", extra_template_basedirs=[str(_TEMPLATES)], embed_images=True,
                            mathjax_url=mathjax_url)
    for i, page in enumerate(pages):
        nb = nbformat.read(page.notebook, as_version=4)
        _clean_widgets(nb)
        banner = "" if page.executed else (
            f'<div class="dslib-banner">This chapter has not been run in this build, so its outputs are missing: '
            f'<code>python -m dslib.book run {page.chapter.number}</code> executes it, then '
            f'<code>python -m dslib.book html</code> rebuilds the site.</div>')
        resources = {
            "metadata": {"name": f"{page.chapter.number} \u00b7 {page.chapter.title}",
                         "path": str((book.root / page.chapter.notebook).parent)},
            "dslib": {"css": _CSS, "nav": _nav(book, i, pages), "banner": banner},
        }
        body, _ = exporter.from_notebook_node(nb, resources=resources)
        body = _offline_images(_rewrite_links(body, book, book.root / page.chapter.notebook, names))
        (out_dir / page.name).write_text(body, encoding="utf-8")
        echo(f"wrote {page.name} ({'executed' if page.executed else 'not run: no outputs'})")

    ledgers = read_ledgers(book.root)
    counts = {lg["chapter"]: {k: sum(1 for r in lg["rows"] if r.get("holds") is k) for k in (True, False, None)}
              for lg in ledgers}
    chapter_pages = {p.chapter.number: p.name for p in pages}
    (out_dir / "index.html").write_text(
        _plain_page(book.title, _nav(book, None, pages), _index_body(book, pages, counts)), encoding="utf-8")
    ledger_body, n_rows = _ledger_body(ledgers, chapter_pages)
    (out_dir / "ledger.html").write_text(
        _plain_page(f"Claims ledger \u00b7 {book.title}", _nav(book, None, pages), ledger_body), encoding="utf-8")
    echo(f"wrote index.html and ledger.html ({n_rows} claims)")
    return Site(out_dir, tuple(pages), local is not None, n_rows)
