"""Test-session settings, hand-written.

Chapters and tests run at `small` scale, and explorers draw their static view: no widget front end runs under nbval.
These are set before nbval starts any kernel, so the chapters' kernels inherit them.
"""

import os

os.environ.setdefault("DSLIB_SCALE", "small")
os.environ.setdefault("DSLIB_STATIC", "1")
