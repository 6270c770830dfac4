"""The one way a figure is saved: checked for a title and labelled axes, stamped with its run.

Every PNG the library writes goes through `save_figure(fig, path)`. It checks that every
axes has a title (or the figure a suptitle), an x and a y label (a label on another axes
of the same grid column / row, or a figure-level `supxlabel` / `supylabel`, counts) and tick
labels of at least MIN_TICK_PT points. Inside `run(label)` (the chapter command line opens
one: "ch3 ch3_gpt:smoke") the label is added to the title, so a PNG names the experiment and
preset that drew it, and the saved paths are collected for the end-of-run summary.

A figure that fails the check is still saved, with a warning; with JAXCOURSE_STRICT_FIGURES=1
(the test suite sets it) it raises FigureError instead, so a test run of a chapter checks
every figure that chapter draws.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import pathlib
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MIN_TICK_PT = 6.0

_RUN: contextvars.ContextVar = contextvars.ContextVar("jaxcourse_figure_run", default=None)


class FigureError(ValueError):
    """A figure without a title, an axis label or legible ticks (strict mode)."""


@contextlib.contextmanager
def run(label: str):
    """Stamps `label` on every figure saved inside; yields the list of their paths."""
    saved: list[pathlib.Path] = []
    token = _RUN.set((label, saved))
    try:
        yield saved
    finally:
        _RUN.reset(token)


def _title(ax) -> str:
    return " ".join(ax.get_title(loc=loc) for loc in ("left", "center", "right")).strip()


def _span(ax, which: str):
    spec = ax.get_subplotspec()
    if spec is None:
        return None
    return (spec.get_gridspec(), spec.colspan if which == "x" else spec.rowspan)


def _labelled(ax, axes, which: str) -> bool:
    """ax has an x (y) label, or another axes of its grid column (row) has one."""
    get = (lambda a: a.get_xlabel()) if which == "x" else (lambda a: a.get_ylabel())
    if get(ax):
        return True
    span = _span(ax, which)
    return span is not None and any(get(a) and _span(a, which) == span for a in axes)


def _content_axes(fig) -> list:
    """The visible axes that are not colorbars (a colorbar carries its own label)."""
    return [ax for ax in fig.axes if ax.axison and ax.get_visible()
            and not hasattr(ax, "_colorbar")]


def problems(fig) -> list[str]:
    """What the figure lacks: a title, axis labels, legible ticks (empty when it is fine)."""
    axes = _content_axes(fig)
    suptitle = fig.get_suptitle()
    out = [] if axes else ["no axes with content"]
    for i, ax in enumerate(axes):
        name = _title(ax) or f"axes {i}"
        if not (suptitle or _title(ax)):
            out.append(f"{name}: no title and no figure suptitle")
        if not (fig.get_supxlabel() or _labelled(ax, axes, "x")):
            out.append(f"{name}: no x label")
        if not (fig.get_supylabel() or _labelled(ax, axes, "y")):
            out.append(f"{name}: no y label")
        small = [t for t in ax.get_xticklabels() + ax.get_yticklabels()
                 if t.get_text() and t.get_fontsize() < MIN_TICK_PT]
        if small:
            out.append(f"{name}: tick labels of {small[0].get_fontsize():g} pt "
                       f"(< {MIN_TICK_PT:g})")
    return out


def _strict() -> bool:
    return os.environ.get("JAXCOURSE_STRICT_FIGURES", "").lower() in ("1", "true", "yes")


def save_figure(fig, path, dpi: int = 100) -> pathlib.Path:
    """Checks `fig` (see the module docstring), adds the run's label to its title, writes
    the PNG and closes the figure. Returns the path."""
    path = pathlib.Path(path)
    issues = problems(fig)
    if issues:
        message = f"figure {path.name}: " + "; ".join(issues)
        if _strict():
            plt.close(fig)
            raise FigureError(message)
        warnings.warn(message, stacklevel=2)
    current = _RUN.get()
    if current is not None:
        label, saved = current
        title, axes = fig.get_suptitle(), _content_axes(fig)
        if title:  # same line, same place: the layout made room for it already
            fig._suptitle.set_text(f"{title} [{label}]")
        elif len(axes) == 1:
            axes[0].set_title(f"{axes[0].get_title()} [{label}]".strip())
        else:  # above the axes; bbox_inches="tight" takes it into the image
            fig.suptitle(label, y=1.0, va="bottom", fontsize=10)
        saved.append(path)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path
