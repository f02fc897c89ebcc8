"""Binder's environment.yml installs what pyproject.toml declares: the package's dependencies and its dev extra."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {_name(r): r for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    pip_lines = re.findall(r'^\s+-\s+"([^"]+)"\s*$', (ROOT / "environment.yml").read_text(encoding="utf-8"), re.M)
    assert "-e ." in pip_lines, "environment.yml must install the package itself (-e .)"
    listed = {_name(r): r for r in pip_lines if r != "-e ."}
    assert set(listed) == set(declared), (sorted(set(declared) - set(listed)), sorted(set(listed) - set(declared)))
    for name, requirement in declared.items():  # the same version floors too
        assert listed[name].replace(" ", "") == requirement.replace(" ", ""), (listed[name], requirement)
