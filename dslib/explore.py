"""Explorers that degrade to a static view. Hand-written plumbing (DESIGN.md, "A chapter, from top to bottom", step 6).

A chapter's explorer is a function of a few parameters that draws a plot or a table. `explore(fn, **controls)` shows
it with ipywidgets controls where a widget front end is running (JupyterLab, Colab, Binder), and otherwise calls it
once with the controls' defaults, so that nbval, CI and a plain `python` script still draw the picture:

    explore(draw, temperature=(0.1, 2.0), model=["dense", "moe"], show_grid=True)

ipywidgets is imported only when it is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

__all__ = ["static_mode", "in_kernel", "explore", "default_value", "start_value", "STATIC_MESSAGE"]

STATIC_MESSAGE = (
    "Static view (no widget front end): showing the defaults; open the notebook in Jupyter to move the controls."
)
_TRUTHY = {"1", "true", "yes", "on"}


def in_kernel() -> bool:
    """True when this code runs inside an IPython kernel (a notebook), not a terminal or a plain script."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def static_mode() -> bool:
    """True when explorers should draw a static view instead of widgets.

    That is when the environment variable `DSLIB_STATIC` is truthy ("1", "true", "yes"), when ipywidgets cannot be
    imported, or when no IPython kernel is running (a script, a terminal, a test).
    """
    if os.environ.get("DSLIB_STATIC", "").strip().lower() in _TRUTHY:
        return True
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return True
    return not in_kernel()


def _slider_middle(low: Real, high: Real, step: Real | None = None) -> Real:
    """The value `ipywidgets.interact` starts a (low, high[, step]) slider at: the middle, on a step, ints kept ints."""
    diff = high - low
    value = low + diff / 2
    if not isinstance(value, type(diff)):
        value = low + diff // 2
    if step is not None:
        if step <= 0:
            raise ValueError(f"a slider's step must be > 0, got {step!r}")
        value = low + int((value - low) / step) * step
    if not low <= value <= high:
        raise ValueError(f"a slider needs min <= max, got ({low!r}, {high!r})")
    return value


def _is_widget(control: Any) -> bool:
    """True for an ipywidgets widget or `ipywidgets.fixed` value (without importing ipywidgets if it is absent)."""
    try:
        import ipywidgets
    except ImportError:
        return False
    return isinstance(control, (ipywidgets.Widget, ipywidgets.fixed))


def default_value(control: Any) -> Any:
    """The value a control starts at, as `ipywidgets.interact` would pick it.

    A widget gives its `.value`; a (min, max) or (min, max, step) tuple of numbers the slider's middle value (ints
    stay ints); a list its first element; a dict its first value; anything else (a bool, a number, a string) itself.
    """
    if _is_widget(control):
        return control.value
    if isinstance(control, tuple) and len(control) in (2, 3) and all(
        isinstance(x, Real) and not isinstance(x, bool) for x in control
    ):
        return _slider_middle(*control)
    if isinstance(control, list):
        if not control:
            raise ValueError("a dropdown control needs at least one option, got an empty list")
        return control[0]
    if isinstance(control, Mapping):
        if not control:
            raise ValueError("a dropdown control needs at least one option, got an empty dict")
        return next(iter(control.values()))
    return control


def start_value(fn: Callable[..., Any], name: str, control: Any) -> Any:
    """The value `ipywidgets.interact(fn, name=control)` shows first: for a slider, fn's own default for `name` (when it
    has one) clamped into the slider's range; for a dropdown, fn's default when it is among the options; otherwise
    (a widget, a checkbox, a text box, or no default) `default_value(control)`."""
    import inspect

    try:
        param = inspect.signature(fn).parameters.get(name)
    except (TypeError, ValueError):
        param = None
    if param is None or param.default is inspect.Parameter.empty or _is_widget(control):
        return default_value(control)
    own = param.default
    if isinstance(control, tuple) and len(control) in (2, 3) and all(
        isinstance(x, Real) and not isinstance(x, bool) for x in control
    ):
        if not isinstance(own, Real) or isinstance(own, bool):
            return default_value(control)
        low, high = control[0], control[1]
        value = min(max(own, low), high)
        return int(value) if all(isinstance(x, int) for x in control) else float(value)
    if isinstance(control, list):
        return own if own in control else default_value(control)
    if isinstance(control, Mapping):
        return own if own in list(control.values()) else default_value(control)
    return default_value(control)


def explore(fn: Callable[..., Any], /, **controls: Any) -> Any:
    """Show `fn` with a control per keyword argument, or, in static mode, call it once with the defaults.

    controls: ipywidgets widgets, or anything `ipywidgets.interact` accepts: (min, max[, step]) tuples for sliders,
        lists (or dicts) for dropdowns, bools for checkboxes, plain values for text boxes.
    With widgets this is `ipywidgets.interact(fn, **controls)` and returns what interact returns; in static mode it
    prints a one-line notice, calls fn with the values the widgets would show first (`start_value`: fn's own
    defaults where the controls can show them) and returns its result.
    """
    if not callable(fn):
        raise TypeError(f"explore needs a function to call, got {type(fn).__name__}")
    if static_mode():
        defaults = {name: start_value(fn, name, control) for name, control in controls.items()}
        print(STATIC_MESSAGE)
        return fn(**defaults)
    import ipywidgets

    return ipywidgets.interact(fn, **controls)
