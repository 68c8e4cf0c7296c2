"""Render a :class:`ditkit.builder.diagram.Diagram` to SVG or PNG with matplotlib (a bare
``Figure`` on the Agg canvas: no display, no pyplot state). Deterministic: the same layout gives
the same bytes (fixed SVG hash salt, no date or creator in the metadata, text kept as text in
the SVG).

matplotlib is the ``diagram`` extra (``pip install ditkit[diagram]``); it is imported only when
a picture is drawn, so the command line starts without it.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path

from ditkit.errors import EnvironmentFault, UserError, require
from ditkit.spec.diff import diff, format_value
from ditkit.spec.io import write_atomic

from .diagram import BOX_H, CHAR, LINE, Diagram, Element, compare, layout
from .presentation import ATTENTION_LOOKS, LOOK_OF_KIND, kind_of

INCH = 0.45  # inches per layout unit (diagram.CHAR units fit one glyph)
FONT = 7.5  # points, box text
DPI = 110  # PNG

KIND_COLOURS = {
    "input": ("#ffffff", "#555555"),
    "output": ("#ffffff", "#555555"),
    "patch": ("#fff4c2", "#a08000"),
    "head": ("#fff4c2", "#a08000"),
    "down": ("#f3f3f3", "#555555"),
    "up": ("#f3f3f3", "#555555"),
    "skip": ("#ffffff", "#555555"),
    "noise": ("#fdeef4", "#a8456f"),
    "classes": ("#fdeef4", "#a8456f"),
    "aux": ("#fdeef4", "#a8456f"),
    "mapping": ("#fdeef4", "#a8456f"),
    "cond": ("#f9dce8", "#a8456f"),
}
CONDITIONING = ("noise", "classes", "aux", "mapping", "cond")
HIGHLIGHT = "#d62020"
CROSS = "#c2185b"


def matplotlib_or_exit():
    """Import matplotlib, or raise a UserError that names the extra."""

    return require("matplotlib", "drawing diagrams")


def check_target(path: str | Path) -> Path:
    """Fail early (before any measuring) on a diagram path ditkit cannot write, or when
    matplotlib is missing."""
    path = Path(path)
    _format(path)
    matplotlib_or_exit()
    return path


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".svg", ".png"):
        raise UserError(f"--diagram {path}: write .svg or .png")
    return suffix[1:]


@contextlib.contextmanager
def _style(mpl):
    with mpl.rc_context(
        {
            "svg.hashsalt": "ditkit-diagram",
            "svg.fonttype": "none",
            # measured with DejaVu Sans; a browser without it falls back to a sans-serif font
            "font.family": "sans-serif",
            "font.sans-serif": ["DejaVu Sans", "Verdana", "Arial", "Helvetica"],
            "font.monospace": ["DejaVu Sans Mono", "Menlo", "Consolas", "Courier New"],
            "font.size": FONT,
            "path.simplify": False,
        }
    ):
        yield


def render(
    diagrams: Diagram | list[Diagram], path: str | Path, changes: list[str] | None = None
) -> Path:
    """Draw one diagram, or several stacked (a comparison), to ``path`` (``.svg``/``.png``).
    ``changes``: text lines listed under the pictures (the field-by-field differences)."""
    path = Path(path)
    fmt = _format(path)
    mpl = matplotlib_or_exit()
    from matplotlib.figure import Figure

    if isinstance(diagrams, Diagram):
        diagrams = [diagrams]
    changes = list(changes or [])
    sizes = [d.bounds() for d in diagrams]
    width = max(x1 - x0 for x0, _, x1, _ in sizes) + 0.6
    heights = [y1 - y0 + 3.2 for _, y0, _, y1 in sizes]  # + title, legend and notes
    text_h = 0.42 * len(changes) + (0.6 if changes else 0)
    total_h = sum(heights) + text_h
    with _style(mpl):
        # a bare Figure (Agg canvas), not pyplot: no global backend or figure registry touched
        fig = Figure(figsize=(width * INCH, total_h * INCH))
        top = total_h
        for d, h, (x0, y0, x1, y1) in zip(diagrams, heights, sizes):
            ax = fig.add_axes((0, (top - h) / total_h, 1, h / total_h))
            _draw(ax, d, (x0, y0, x1, y1), width, h)
            top -= h
        if changes:
            ax = fig.add_axes((0, 0, 1, text_h / total_h))
            ax.set_axis_off()
            ax.set_xlim(0, width)
            ax.set_ylim(0, text_h)
            y = text_h - 0.45
            for line in changes:
                changed = line.startswith(("≠", "    "))
                ax.text(
                    0.3,
                    y,
                    line,
                    ha="left",
                    va="center",
                    family="monospace",
                    fontsize=FONT,
                    color=HIGHLIGHT if changed else "#222222",
                )
                y -= 0.42
        buf = io.BytesIO()
        if fmt == "svg":
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
        else:
            fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    _write(path, buf.getvalue())
    return path


def _write(path: Path, data: bytes) -> None:
    """All or nothing, through a fresh uniquely named temporary file (a symlink planted at a
    fixed temporary name cannot redirect the write), renamed over ``path``."""

    try:
        write_atomic(path, data)
    except EnvironmentFault as err:
        raise EnvironmentFault(f"could not write the diagram: {err}") from None


def _draw(ax, d: Diagram, bounds, width: float, height: float) -> None:
    from matplotlib.patches import Circle, FancyBboxPatch, Rectangle

    x0, y0, x1, y1 = bounds
    ax.set_axis_off()
    left = x0 - 0.3
    ax.set_xlim(left, left + width)
    ax.set_ylim(y1 + 1.3 - height, y1 + 1.3)
    ax.text(
        left + 0.3, y1 + 0.95, d.title, ha="left", va="center", fontsize=FONT + 3, weight="bold"
    )
    ax.text(
        left + 0.3, y1 + 0.45, d.subtitle, ha="left", va="center", fontsize=FONT, color="#333333"
    )
    centres = {e.id: e for e in d.elements}
    for e in d.elements:
        if e.kind == "band":
            ax.add_patch(
                Rectangle(
                    (e.x - e.w / 2, e.y - e.h / 2),
                    e.w,
                    e.h,
                    facecolor="#f6f6f6",
                    edgecolor=HIGHLIGHT if e.highlight else "#d0d0d0",
                    lw=1.6 if e.highlight else 0.6,
                    zorder=0,
                )
            )
            if e.level == 0:  # one line along the top of the outer band
                ax.text(
                    e.x - e.w / 2 + 0.15,
                    e.y + e.h / 2 - 0.25,
                    e.lines[0],
                    ha="left",
                    va="center",
                    fontsize=FONT,
                    weight="bold",
                    zorder=1,
                )
                ax.text(
                    e.x - e.w / 2 + 0.15 + 0.14 * len(e.lines[0]),
                    e.y + e.h / 2 - 0.25,
                    " · ".join(e.lines[1:]),
                    ha="left",
                    va="center",
                    fontsize=FONT,
                    color="#333333",
                    zorder=1,
                )
            else:  # inner levels: beside the band, in the hourglass's empty corner
                for k, line in enumerate(e.lines):
                    ax.text(
                        e.x - e.w / 2 - 0.2,
                        e.y + 0.3 - k * 0.3,
                        line,
                        ha="right",
                        va="center",
                        fontsize=FONT,
                        zorder=1,
                        weight="bold" if k == 0 else "normal",
                        color="#222222" if k == 0 else "#333333",
                    )
    for link in d.edges:
        _edge(ax, centres[link.src], centres[link.dst], link.kind, d)
    for e in d.elements:
        if e.kind == "band":
            continue
        if e.kind == "blocks":
            assert e.attention is not None  # every block box names its attention
            look = LOOK_OF_KIND[e.attention]
            fill, edge = look.fill, look.edge
        else:
            fill, edge = KIND_COLOURS[e.kind]
        lw = 0.8
        if e.highlight:
            edge, lw = HIGHLIGHT, 2.0
        if e.kind == "skip":
            ax.add_patch(
                Circle((e.x, e.y), e.w / 2, facecolor=fill, edgecolor=edge, lw=lw, zorder=3)
            )
            ax.text(e.x, e.y, e.lines[0], ha="center", va="center", fontsize=FONT - 1, zorder=4)
            continue
        if e.kind == "blocks" and e.count > 1:  # a run: a stack of cards
            for k in (2, 1):
                ax.add_patch(
                    FancyBboxPatch(
                        (e.x - e.w / 2 + 0.07 * k, e.y - e.h / 2 + 0.07 * k),
                        e.w,
                        e.h,
                        boxstyle="round,pad=0,rounding_size=0.08",
                        facecolor=fill,
                        edgecolor=edge,
                        lw=0.6,
                        zorder=2,
                    )
                )
        ax.add_patch(
            FancyBboxPatch(
                (e.x - e.w / 2, e.y - e.h / 2),
                e.w,
                e.h,
                boxstyle="round,pad=0,rounding_size=0.08",
                facecolor=fill,
                edgecolor=edge,
                lw=lw,
                zorder=3,
                linestyle="-" if e.kind != "up" else "--",
            )
        )
        if e.cross_attention:  # a coloured bar on the left edge
            ax.add_patch(
                Rectangle(
                    (e.x - e.w / 2, e.y - e.h / 2),
                    0.12,
                    e.h,
                    facecolor=CROSS,
                    edgecolor="none",
                    zorder=4,
                )
            )
        lines = list(e.lines)
        n = len(lines)
        pitch = LINE
        for k, line in enumerate(lines):
            ax.text(
                e.x,
                e.y + (n - 1) / 2 * pitch - k * pitch,
                line,
                ha="center",
                va="center",
                fontsize=FONT - (0.5 if len(line) > 24 else 0),
                zorder=5,
                color="#111111" if k == 0 else "#333333",
            )
        if e.kind == "blocks":
            ax.text(
                e.x + e.w / 2 - 0.06,
                e.y + e.h / 2 + 0.1,
                f"×{e.count}",
                ha="right",
                va="bottom",
                fontsize=FONT + 0.5,
                weight="bold",
                zorder=5,
                color=edge,
            )
    _legend(ax, d, left + 0.3, y0 - 0.9)


def _between(d: Diagram, a: Element, b: Element) -> bool:
    """Whether another element sits on the row between ``a`` and ``b``."""
    return any(
        abs(e.y - a.y) < 1e-6 and min(a.x, b.x) < e.x < max(a.x, b.x)
        for e in d.elements
        if e.kind != "band"
    )


def _edge(ax, a: Element, b: Element, kind: str, d: Diagram) -> None:
    from matplotlib.patches import FancyArrowPatch

    if kind == "skip":  # up from the source, along the level's row above its boxes, down
        y = b.y + BOX_H / 2 + 0.45
        if a.y - a.h / 2 <= y <= a.y + a.h / 2:  # a transition beside the line: its side
            xs, ys = [a.x + a.w / 2, b.x], [y, y]
        else:
            xs, ys = [a.x, a.x, b.x], [a.y + a.h / 2 if a.y < y else a.y - a.h / 2, y, y]
        ax.plot(xs, ys, color="#666666", lw=0.9, linestyle=(0, (3, 2)), zorder=1)
        ax.add_patch(
            FancyArrowPatch(
                (b.x, y),
                (b.x, b.y + b.h / 2),
                arrowstyle="-|>",
                mutation_scale=7,
                lw=0.9,
                color="#666666",
                linestyle=(0, (3, 2)),
                zorder=1,
                shrinkA=0,
                shrinkB=0,
            )
        )
        return
    if kind == "cond" and abs(a.y - b.y) < 1e-6 and not _between(d, a, b):
        kind = "flow"  # neighbours on the lane: a plain arrow
    if kind == "cond":  # along a bus under the conditioning lane
        # one bus per destination, so two paths never run on top of each other
        bus = min(a.y - a.h / 2, b.y - b.h / 2) - (0.45 if b.kind == "cond" else 0.25)
        colour = "#a8456f"
        ax.plot(
            [a.x, a.x, b.x - 0.25],
            [a.y - a.h / 2, bus, bus],
            color=colour,
            lw=0.8,
            zorder=2,
            solid_capstyle="butt",
        )
        ax.add_patch(
            FancyArrowPatch(
                (b.x - 0.25, bus),
                (b.x - 0.25, b.y - b.h / 2),
                arrowstyle="-|>",
                mutation_scale=8,
                lw=0.8,
                color=colour,
                shrinkA=0,
                shrinkB=0,
                zorder=2,
            )
        )
        return
    if a.kind == "input" and b.kind == "down":  # repatch: a fresh embedding of the input
        start, end = (a.x, a.y - a.h / 2), (b.x - b.w / 2, b.y)
        ax.add_patch(
            FancyArrowPatch(
                start,
                end,
                arrowstyle="-|>",
                mutation_scale=8,
                lw=0.9,
                color="#333333",
                connectionstyle="angle,angleA=-90,angleB=0,rad=0.3",
                shrinkA=0,
                shrinkB=1,
                zorder=2,
            )
        )
        return
    colour = "#a8456f" if a.kind in CONDITIONING else "#333333"
    if abs(a.x - b.x) < 1e-6:  # a column (the innermost level's middle stack)
        start, end = (a.x, a.y - a.h / 2), (b.x, b.y + b.h / 2)
    else:
        start, end = (a.x + a.w / 2, a.y), (b.x - b.w / 2, b.y)
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle="-|>",
            mutation_scale=8,
            lw=0.9,
            color=colour,
            shrinkA=1,
            shrinkB=1,
            zorder=2,
        )
    )


def _legend(ax, d: Diagram, x: float, y: float) -> None:
    from matplotlib.patches import FancyBboxPatch, Rectangle

    def text(x, s, colour="#333333"):
        ax.text(x, y, s, ha="left", va="center", fontsize=FONT - 0.5, color=colour)
        return x + CHAR * len(s) + 0.5

    used = {e.attention for e in d.find("blocks")}
    for cls, look in ATTENTION_LOOKS.items():
        if kind_of(cls) not in used:
            continue
        ax.add_patch(
            FancyBboxPatch(
                (x, y - 0.15),
                0.45,
                0.3,
                boxstyle="round,pad=0,rounding_size=0.05",
                facecolor=look.fill,
                edgecolor=look.edge,
                lw=0.8,
            )
        )
        x = text(x + 0.55, look.legend)
    if any(e.cross_attention for e in d.elements):
        ax.add_patch(Rectangle((x, y - 0.15), 0.12, 0.3, facecolor=CROSS, edgecolor="none"))
        x = text(x + 0.22, "cross-attention")
    x = text(x, "×n: n equal blocks in a row")
    if d.find("skip"):
        ax.plot([x, x + 0.5], [y, y], color="#666666", lw=0.9, linestyle=(0, (3, 2)))
        x = text(x + 0.6, "skip")
    if any(e.highlight for e in d.elements):
        ax.add_patch(
            Rectangle((x, y - 0.15), 0.45, 0.3, facecolor="none", edgecolor=HIGHLIGHT, lw=2.0)
        )
        text(x + 0.55, "differs from the other spec", HIGHLIGHT)
    for k, note in enumerate(d.notes):
        ax.text(
            ax.get_xlim()[0] + 0.3,
            y - 0.45 - 0.35 * k,
            note,
            ha="left",
            va="center",
            fontsize=FONT - 0.5,
            color="#555555",
        )


# --------------------------------------------------------------------------------------------
# entry points


def draw(spec, path: str | Path, resolution: tuple[int, int] | None = None, report=None) -> Diagram:
    """Lay out ``spec`` (at ``resolution``) and render it to ``path``; returns the layout."""

    diagram = layout(spec, resolution, report)
    render(diagram, path)
    return diagram


MAX_CHANGE_LINES = 24


def change_lines(rows, limit: int = 120, max_lines: int = MAX_CHANGE_LINES) -> list[str]:
    """The field-by-field differences as lines for the foot of a comparison picture: one line
    per field, or the field and then its two values on their own lines when they are long."""

    if not rows:
        return ["no field differs"]
    width = min(40, max(len(r.path) for r in rows))
    lines = [f"{len(rows)} field(s) differ (a → b):"]
    for r in rows[:max_lines]:
        a, b = format_value(r.a), format_value(r.b)
        one = f"≠ {r.path.ljust(width)}  {a}  →  {b}"
        if len(one) <= limit:
            lines.append(one)
        else:
            lines += [
                f"≠ {r.path}",
                f"    a: {format_value(r.a, limit - 7)}",
                f"    b: {format_value(r.b, limit - 7)}",
            ]
    if len(rows) > max_lines:
        lines.append(f"... and {len(rows) - max_lines} more (ditkit diff prints them all)")
    return lines


def draw_comparison(
    a,
    b,
    path: str | Path,
    resolution_a: tuple[int, int] | None = None,
    resolution_b: tuple[int, int] | None = None,
    label_a: str = "a",
    label_b: str = "b",
    measure: bool = True,
    reports=None,
):
    """Both specs, one above the other, with what differs highlighted on each, and the
    differing fields listed underneath. ``reports``: the two specs' ``describe`` reports when
    already measured. Returns ``(layout a, layout b, rows)``."""

    report_a, report_b = reports or (None, None)
    da, db = compare(a, b, resolution_a, resolution_b, report_a, report_b, measure=measure)
    da = replace(da, title=_titled("a", label_a, da.title, a.name))
    db = replace(db, title=_titled("b", label_b, db.title, b.name))
    rows = diff(a, b)
    render([da, db], path, change_lines(rows))
    return da, db, rows


def _titled(side: str, label: str, title: str, name: str) -> str:
    return f"{side}: {title}" if label in (name, side) else f"{side}: {title}  ({label})"
