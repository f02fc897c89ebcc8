"""`python -m dslib <command>`: hand-written plumbing that dispatches to the package's commands.

    capstone    the whole pipeline, with its report card (dslib.capstone)
    book        the course tool (dslib.book): export, check, run, ...
    pretrained  build the cached models the chapters start from (dslib.pretrained)
"""

from __future__ import annotations

import sys

COMMANDS = ("capstone", "book", "pretrained")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "capstone":
        from dslib.capstone import main as run
        return run(rest)
    if command == "book":
        from dslib.book import main as run
    else:
        from dslib.pretrained import main as run
    result = run(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
