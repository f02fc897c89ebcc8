"""Diagrams drawn by code, in one visual style across the course. Hand-written plumbing (no chapter teaches it).

A chapter's map is boxes and arrows on a canvas measured in inches, so that a box at (x, y) of size (w, h) sits where
the numbers say:

    d = Diagram(12, 3.6, "R1's pipeline")
    d.box(0.1, 2.3, 1.7, 0.9, "base model", "model")
    d.box(2.4, 2.3, 2.2, 0.9, "cold start", "stage")
    d.arrow(1.8, 2.75, 2.4, 2.75, "SFT")
    d.show()

Colours name what a box holds (STYLE), so that a model, a training stage, a measurement and data look the same in
every chapter.
"""

from __future__ import annotations

import matplotlib.pyplot as plt

__all__ = ["STYLE", "Diagram"]

STYLE = {
    "model": "#dbe9f6",  # a model (pretrained, cached, a student)
    "stage": "#fdebd0",  # a training stage or an operation on data
    "measure": "#d5f5e3",  # what is measured, an output
    "baseline": "#eeeeee",  # a baseline or an input
    "question": "#f5eef8",  # the questions a chapter asks
}


class Diagram:
    """A canvas of width x height inches with boxes and arrows; `show()` draws it."""

    def __init__(self, width: float, height: float, title: str | None = None):
        if not (width > 0 and height > 0):
            raise ValueError(f"Diagram({width!r}, {height!r}): a positive width and height are required")
        self.fig, self.ax = plt.subplots(figsize=(width, height))
        self.ax.set_xlim(0, width)
        self.ax.set_ylim(0, height)
        self.ax.axis("off")
        if title:
            self.ax.set_title(title, fontsize=11)

    def box(self, x: float, y: float, w: float, h: float, text: str, kind: str = "stage",
            fontsize: float = 8.5, bold: bool = False) -> None:
        """A box with its lower-left corner at (x, y), coloured by kind (a key of STYLE); bold: a thick outline, for
        what a figure wants the eye to find (for example what a cache keeps)."""
        if kind not in STYLE:
            raise ValueError(f"kind={kind!r} is invalid: one of {tuple(STYLE)}")
        self.ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=STYLE[kind], edgecolor="#333333",
                                        lw=3.0 if bold else 1.2, zorder=2))
        self.ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, zorder=3)

    def arrow(self, x0: float, y0: float, x1: float, y1: float, text: str = "", dy: float = 0.12) -> None:
        """An arrow from (x0, y0) to (x1, y1), with an optional label dy above its middle."""
        self.ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.3, color="#333333"))
        if text:
            self.ax.text((x0 + x1) / 2, (y0 + y1) / 2 + dy, text, ha="center", fontsize=7.5, color="#555555")

    def show(self) -> None:
        self.fig.tight_layout()
        plt.show()
