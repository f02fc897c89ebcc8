"""dslib.diagram: boxes and arrows land where their numbers say, coloured by what they hold; bad input is named."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dslib.diagram import STYLE, Diagram  # noqa: E402


def test_boxes_and_arrows():
    d = Diagram(4, 2, "a title")
    d.box(0.5, 0.5, 1.0, 0.8, "model", "model")
    d.arrow(1.5, 0.9, 2.5, 0.9, "label")
    (rect,) = d.ax.patches
    assert rect.get_xy() == (0.5, 0.5) and rect.get_width() == 1.0 and rect.get_height() == 0.8
    assert matplotlib.colors.to_hex(rect.get_facecolor()) == STYLE["model"]
    assert [t.get_text() for t in d.ax.texts] == ["model", "", "label"]  # the box text, the arrow, its label
    assert d.ax.get_xlim() == (0, 4) and d.ax.get_title() == "a title"
    plt.close(d.fig)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kind"):
        d = Diagram(2, 1)
        d.box(0, 0, 1, 1, "x", "nonsense")
    with pytest.raises(ValueError, match="width and height"):
        Diagram(0, 1)
    plt.close("all")
