"""The Colab path: a chapter's set-up cell, where dslib is missing, clones the course and installs dslib from the
clone. This runs that branch for real, in a fresh virtual environment without dslib, from a local clone of this
repository (DSLIB_REPOSITORY points the cell there instead of the public address), then runs the chapter's first
cells, which read the course's data files from the clone.

Like Colab, the environment comes with the scientific stack already installed: it sees this environment's packages
(torch, numpy, matplotlib, ...) through a path file, but not dslib, whose installation is a path file of its own
that is not read there. So the set-up cell's `pip install -e` resolves dslib's dependencies against what is present,
as on Colab, without downloading torch again."""

from __future__ import annotations

import os
import site
import subprocess
import venv
from pathlib import Path

import pytest

from dslib.book import find_root, parse_cells

ROOT = find_root(Path(__file__))
CHAPTER_SOURCE = ROOT / "chapters" / "00_foundations.py"
FIRST_CELLS = 4  # the set-up cell, and the cells that read assets/deepseek_papers.csv and print the papers


def _git(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)


def test_the_set_up_cell_installs_dslib_from_a_clone_in_a_fresh_environment(tmp_path):
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("the repository is not a git checkout, so the set-up cell has nothing to clone")
    if _git("rev-parse", "HEAD").returncode != 0:
        pytest.skip("the repository has no commit yet to clone")
    # the set-up cell of the committed chapter: that is what a clone holds
    committed = _git("show", f"HEAD:{CHAPTER_SOURCE.relative_to(ROOT).as_posix()}")
    assert committed.returncode == 0, committed.stderr
    cells = [c for c in parse_cells(committed.stdout) if c.kind == "code"][:FIRST_CELLS]
    assert "DSLIB_REPOSITORY" in "\n".join(cells[0].lines), "the set-up cell cannot be pointed at a local clone"

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    target_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    here = [p for p in site.getsitepackages() + [site.getusersitepackages()] if Path(p, "torch").is_dir()]
    assert here, "torch is installed here, so some site-packages folder holds it"
    Path(target_site, "preinstalled.pth").write_text("\n".join(here) + "\n", encoding="utf-8")

    home, content = tmp_path / "home", tmp_path / "content"
    home.mkdir()
    content.mkdir()
    script = content / "first_cells.py"
    script.write_text("\n\n".join("\n".join(c.lines) for c in cells) + "\n\n"
                      "import dslib\nprint('dslib from', Path(dslib.__file__).resolve())\n"
                      "print('cwd', Path.cwd().resolve())\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DSLIB_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), DSLIB_REPOSITORY=ROOT.resolve().as_uri(), DSLIB_SCALE="small", MPLBACKEND="Agg",
               DSLIB_CACHE=str(tmp_path / "cache"), DSLIB_BUILD=str(tmp_path / "build"),
               PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", PIP_DISABLE_PIP_VERSION_CHECK="1")
    check = subprocess.run([str(python), "-c", "import importlib.util, torch; "
                            "print(importlib.util.find_spec('dslib'), torch.__version__)"],
                           capture_output=True, text=True, env=env, cwd=content)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("None "), f"dslib is visible before the set-up cell ran: {check.stdout}"

    done = subprocess.run([str(python), str(script)], capture_output=True, text=True, env=env, cwd=content,
                          timeout=900)
    assert done.returncode == 0, f"the first cells failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    clone = (home / "deepseek-from-scratch").resolve()
    assert (clone / "book.toml").is_file() and (clone / ".git").is_dir(), "the set-up cell did not clone the course"
    assert f"dslib from {clone / 'dslib' / '__init__.py'}" in done.stdout
    assert f"cwd {clone / 'chapters'}" in done.stdout
    assert "arXiv 2401.02954" in done.stdout, "the papers table, read from the clone's assets/, was not printed"
    # and a new Python in that environment imports dslib from the clone: it was installed, not only put on the path
    again = subprocess.run([str(python), "-c", "import dslib; print(dslib.__file__)"], capture_output=True,
                           text=True, env=env, cwd=content)
    assert again.returncode == 0 and Path(again.stdout.strip()).resolve().is_relative_to(clone), again
