"""Architecture diagrams from a spec: the layout, as data.

``layout(spec)`` places every part of the model a spec describes on a plane, in forward order,
as an hourglass (the shape of HDiT's and MDiT's architecture figures): the outer level on the
top row, each inner level one row lower, the innermost level's middle blocks at the bottom,
the way back up on the right. What it places:

- the input and the patch embedding (with the absolute position table, if any);
- per level a *band* (its token grid at the chosen resolution, ``d_model``, heads, block count,
  parameters and GMACs as :func:`ditkit.builder.describe` measures them);
- its blocks, one box per run of identical consecutive blocks (``count`` of them), each with
  its attention kind (global, neighborhood with its kernel, shifted window, aggregate, none),
  cross-attention and modulation;
- the transitions between levels (merge / repatch down, split / upsample up), the skip line
  and how it merges (lerp, add, concat, linear);
- the head and the output;
- the conditioning path (noise level, classes, auxiliary inputs -> mapping network -> the
  conditioning vector) on its own lane below.

The layout is plain data -- a :class:`Diagram` of :class:`Element` and :class:`Edge` -- so tests
check the picture's structure from what was placed, and ``ditkit.builder.diagram_render`` only
turns it into an SVG or a PNG with matplotlib. ``compare(a, b)`` marks the elements whose spec
content differs between two specs (levels aligned as ``ditkit.spec.diff`` aligns them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Iterable, Literal, cast

from pydantic import BaseModel

from ditkit import spec as S
from ditkit.spec.diff import align_levels

from .accounting import describe
from .presentation import attention_heads, attention_text

# layout units (the renderer maps them to inches)
ROW = 2.5  # vertical distance between two levels
GAP = 0.35  # horizontal gap between neighbours
BOX_H = 1.15  # block boxes
RUN_W = 2.4  # a run of blocks (at least)
IO_W = 1.6  # input / output
PATCH_W = 1.6  # patch embedding / head
TRANS_W = 1.6  # down / up transitions
TRANS_H = 0.8
MERGE_W = 0.85  # skip merge node
LANE_GAP = 0.5  # between the innermost level and the conditioning lane
COND_W = 2.4
COND_H = 0.85
CHAR = 0.13  # width of one character of box text, in layout units
LINE = 0.28  # line pitch of box text

STACKS: tuple[Literal["encoder", "middle", "decoder"], ...] = ("encoder", "middle", "decoder")


@dataclass(frozen=True)
class Element:
    """One placed thing. ``x``, ``y`` are its centre, ``w``, ``h`` its size (layout units)."""

    id: str
    kind: str
    """``input``, ``patch``, ``band``, ``blocks``, ``down``, ``up``, ``skip``, ``head``,
    ``output``, ``noise``, ``classes``, ``aux``, ``mapping``, ``cond``."""
    lines: tuple[str, ...]
    x: float
    y: float
    w: float
    h: float
    level: int | None = None
    stack: str | None = None
    first: int = 0
    """Index of the run's first block in its stack (``blocks`` only)."""
    count: int = 1
    """Blocks in the run (``blocks`` only)."""
    attention: str | None = None
    """The run's attention kind: ``global``, ``neighborhood``, ``shifted_window``,
    ``aggregate`` or ``none``."""
    variant: str | None = None
    """The component's ``kind`` (merge, repatch, split, upsample, lerp, ...) where it has one."""
    cross_attention: bool = False
    modulation: str | None = None
    params: int | None = None
    """Parameters of the level (``band`` only; ``None`` when drawn without measuring)."""
    gmacs: float | None = None
    """Forward multiply-adds of the level, in G (``band`` only)."""
    highlight: bool = False

    @property
    def label(self) -> str:
        return " / ".join(self.lines)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str  # "flow", "skip", "cond"
    label: str = ""


@dataclass
class Diagram:
    title: str
    subtitle: str
    elements: list[Element]
    edges: list[Edge]
    notes: list[str] = field(default_factory=list)

    def find(
        self, kind: str | None = None, level: int | None = None, stack: str | None = None
    ) -> list[Element]:
        return [
            e
            for e in self.elements
            if (kind is None or e.kind == kind)
            and (level is None or e.level == level)
            and (stack is None or e.stack == stack)
        ]

    def element(self, id: str) -> Element:
        for e in self.elements:
            if e.id == id:
                return e
        raise KeyError(id)

    def bounds(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` over every element."""
        xs0 = [e.x - e.w / 2 for e in self.elements]
        xs1 = [e.x + e.w / 2 for e in self.elements]
        ys0 = [e.y - e.h / 2 for e in self.elements]
        ys1 = [e.y + e.h / 2 for e in self.elements]
        return min(xs0), min(ys0), max(xs1), max(ys1)

    def highlighted(self) -> list[Element]:
        return [e for e in self.elements if e.highlight]

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "subtitle": self.subtitle,
            "notes": self.notes,
            "elements": [e.__dict__ | {"lines": list(e.lines)} for e in self.elements],
            "edges": [e.__dict__ for e in self.edges],
        }


# --------------------------------------------------------------------------------------------
# labels


def modulation_text(mod) -> str:
    match mod:
        case S.AdaLNZero():
            return "adaLN-Zero"
        case S.AdaScale(activation=act):
            return "AdaRMS" + ("" if act == "none" else f" ({act})")
        case S.SharedAdaLNZero():
            return "shared adaLN"
        case S.NoModulation():
            return "no mod."
    raise AssertionError(mod)


def _down_text(down, spec: S.ModelSpec, i: int) -> tuple[str, ...]:
    nxt = spec.levels[i + 1].d_model
    match down:
        case S.Merge(factor=f):
            return (f"merge {f}×{f}", f"→ d {nxt}")
        case S.Repatch(patch_size=p, position=pos):
            extra = "" if pos.kind == "none" else f" + {pos.kind}"
            return (f"repatch {p}×{p}", f"from input{extra}")
    raise AssertionError(down)


def _up_text(up, spec: S.ModelSpec, i: int, factor: int) -> tuple[str, ...]:
    match up:
        case S.Split() | None:
            return (f"split {factor}×{factor}", f"→ d {spec.levels[i].d_model}")
        case S.Upsample():
            return (f"upsample {factor}×", "linear+shuffle")
    raise AssertionError(up)


def _skip_text(skip) -> str:
    match skip:
        case S.LerpSkip():
            return "lerp"
        case S.AddSkip():
            return "add"
        case S.ConcatSkip():
            return "concat"
        case S.LinearSkip():
            return "+ linear"
        case S.NoSkip():
            return "none"
    raise AssertionError(skip)


def _head_text(head) -> tuple[str, ...]:
    match head:
        case S.LinearHead(norm=norm):
            lines: tuple[str, ...] = (
                "head",
                f"{'RMS' if norm.kind == 'rms' else 'Layer'}Norm → linear",
            )
        case S.AdaLNHead(shared=shared):
            lines = ("head", "adaLN → linear") + (("(shared adaLN)",) if shared else ())
        case _:
            raise AssertionError(head)
    return lines + (("+ learned σ",) if head.learned_sigma else ())


def _noise_text(noise) -> tuple[str, ...]:
    match noise:
        case S.SinusoidalNoise(frequency_dim=n, activation=act):
            return ("noise level t", f"sinusoidal {n} → MLP", f"({act})")
        case S.FourierNoise():
            return ("noise level σ", "Fourier features", "of ln(σ)/4")
        case S.FNONoise(points=p, modes=m):
            return ("flow time t", "FNO embedding", f"{p} points, {m} modes")
    raise AssertionError(noise)


def _classes_text(classes) -> tuple[str, ...]:
    null = " + null" if classes.null_class else ""
    match classes.inject:
        case "vector":
            how: tuple[str, ...] = ("embedding, added to c",)
        case "prefix":
            how = (f"{classes.tokens} prefix tokens", "joined to every level")
        case "memory":
            how = ("one token for", "cross-attention")
        case _:
            raise AssertionError(classes.inject)
    return (f"{classes.count} classes{null}",) + how


def text_width(lines) -> float:
    """Width of the longest line in layout units (the renderer's font at ``CHAR`` a glyph)."""
    return CHAR * max((len(line) for line in lines), default=0)


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def _fmt_gmacs(g: float) -> str:
    return f"{g:.1f}" if g >= 10 else f"{g:.2f}" if g >= 0.01 else f"{g:.4f}"


# --------------------------------------------------------------------------------------------
# layout


def runs(blocks: list[S.Block]) -> list[tuple[int, int]]:
    """``(first, count)`` of every run of equal consecutive blocks."""
    out: list[tuple[int, int]] = []
    for j, blk in enumerate(blocks):
        if out and blocks[out[-1][0]] == blk:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((j, 1))
    return out


def layout(
    spec: S.ModelSpec, resolution: tuple[int, int] | None = None, report=None, measure: bool = True
) -> Diagram:
    """Place every part of ``spec`` (at ``resolution``, default its training one). ``report``:
    a :class:`ditkit.builder.Report` of the same spec and resolution (measured here when not
    given) for the per-level parameters and GMACs; ``measure=False`` leaves them out (the
    structure alone, no model is built)."""
    resolution = cast(tuple[int, int], tuple(resolution or spec.input.resolution))
    issues = spec.check_resolution(resolution, "--resolution")
    if issues:
        raise S.SpecError(issues, f"{spec.name} at {resolution[0]}x{resolution[1]}")
    if report is None and measure:
        report = describe(spec, resolution)
    if report is not None and (tuple(report.resolution) != resolution or report.name != spec.name):
        raise ValueError(
            f"report is for {report.name} at {report.resolution}, not {spec.name} at {resolution}"
        )
    placer = _Placer(spec, resolution, report)
    return placer.run()


class _Placer:
    def __init__(self, spec: S.ModelSpec, resolution, report):
        self.spec, self.resolution, self.report = spec, resolution, report
        self.grids = spec.token_grids(resolution)
        self.factors = spec.factors()
        self.n = len(spec.levels)
        self.elements: list[Element] = []
        self.edges: list[Edge] = []
        self.cursor = 0.0
        self.prev: str | None = None  # the element the main stream comes from

    # -- helpers
    def row(self, level: float) -> float:
        return -level * ROW

    def put(
        self,
        id: str,
        kind: str,
        lines,
        w: float,
        h: float,
        level_row: float,
        flow: bool = True,
        **kw,
    ) -> Element:
        w = max(w, text_width(lines) + 0.35)
        h = max(h, LINE * len(lines) + 0.25)
        el = Element(
            id=id,
            kind=kind,
            lines=tuple(lines),
            x=self.cursor + w / 2,
            y=self.row(level_row),
            w=w,
            h=h,
            **kw,
        )
        self.elements.append(el)
        self.cursor += w + GAP
        if flow:
            if self.prev is not None:
                self.edges.append(Edge(self.prev, id, "flow"))
            self.prev = id
        return el

    def stack(self, i: int, which: Literal["encoder", "middle", "decoder"]) -> None:
        """One box per run of equal blocks, left to right; the innermost level's middle stack
        goes top to bottom when it has more than two runs (the hourglass's bottom), which
        keeps the picture narrow enough for a page."""
        blocks = self.spec.stack(i, which)
        d_model = self.spec.levels[i].d_model
        boxes = []
        for k, (first, count) in enumerate(runs(blocks)):
            blk = blocks[first]
            n_heads = attention_heads(blk.attention, d_model, blk.d_head)
            heads = "" if n_heads is None else f"{n_heads} heads · "
            cross = isinstance(blk.cross_attention, S.MemoryCrossAttention)
            lines = [attention_text(blk.attention).box]
            if cross:
                lines.append("+ cross-attention")
            lines.append(heads + modulation_text(blk.modulation))
            boxes.append((k, first, count, blk, cross, lines))
        vertical = which == "middle" and len(boxes) > 2
        if vertical:
            width = max(RUN_W, max(text_width(b[5]) for b in boxes) + 0.35)
            x = self.cursor + width / 2
            y = self.row(i)
            for k, first, count, blk, cross, lines in boxes:
                id = f"L{i}.{which}.{k}"
                h = max(BOX_H, LINE * len(lines) + 0.25)
                self.elements.append(
                    Element(
                        id=id,
                        kind="blocks",
                        lines=tuple(lines),
                        x=x,
                        y=y,
                        w=width,
                        h=h,
                        level=i,
                        stack=which,
                        first=first,
                        count=count,
                        attention=blk.attention.kind,
                        cross_attention=cross,
                        modulation=blk.modulation.kind,
                    )
                )
                if self.prev is not None:
                    self.edges.append(Edge(self.prev, id, "flow"))
                self.prev = id
                y -= h + 0.45
            self.cursor += width + GAP
            return
        for k, first, count, blk, cross, lines in boxes:
            self.put(
                f"L{i}.{which}.{k}",
                "blocks",
                lines,
                RUN_W,
                BOX_H,
                i,
                level=i,
                stack=which,
                first=first,
                count=count,
                attention=blk.attention.kind,
                cross_attention=cross,
                modulation=blk.modulation.kind,
            )

    # -- the model, in forward order
    def run(self) -> Diagram:
        spec = self.spec
        h, w = self.resolution
        space = "latent" if spec.input.space == "latent" else "pixels"
        self.put(
            "input", "input", ("input", f"{h}×{w}×{spec.input.channels}", space), IO_W, BOX_H, 0
        )
        ph, pw = S.pair(spec.patch.size)
        pos = () if spec.position.kind == "none" else (f"+ {spec.position.kind} pos.",)
        self.put(
            "patch",
            "patch",
            (f"patch {ph}×{pw}", f"→ d {spec.levels[0].d_model}") + pos,
            PATCH_W,
            BOX_H,
            0,
        )
        skip_src: dict[int, str] = {}
        for i, lvl in enumerate(spec.levels):
            if i == self.n - 1:
                self.stack(i, "middle")
                break
            self.stack(i, "encoder")
            assert self.prev is not None  # the patch box came first
            skip_src[i] = self.prev
            down_id = f"L{i}.down"
            assert lvl.down is not None and lvl.skip is not None  # the spec checks outer levels
            is_repatch = isinstance(lvl.down, S.Repatch)
            self.put(
                down_id,
                "down",
                _down_text(lvl.down, spec, i),
                TRANS_W,
                TRANS_H,
                i + 0.5,
                flow=not is_repatch,
                level=i,
                variant=lvl.down.kind,
            )
            if is_repatch:  # the inner level is a fresh patch embedding of the input
                self.edges.append(Edge("input", down_id, "flow"))
                self.prev = down_id
        for i in reversed(range(self.n - 1)):
            lvl = spec.levels[i]
            up = lvl.up or S.Split()
            self.put(
                f"L{i}.up",
                "up",
                _up_text(up, spec, i, self.factors[i]),
                TRANS_W,
                TRANS_H,
                i + 0.5,
                level=i,
                variant=up.kind,
            )
            assert lvl.skip is not None  # the spec checks outer levels
            if lvl.skip.kind != "none":
                self.put(
                    f"L{i}.skip",
                    "skip",
                    (_skip_text(lvl.skip),),
                    MERGE_W,
                    MERGE_W,
                    i,
                    level=i,
                    variant=lvl.skip.kind,
                )
                self.edges.append(Edge(skip_src[i], f"L{i}.skip", "skip"))
            self.stack(i, "decoder")
        self.put("head", "head", _head_text(spec.head), PATCH_W, BOX_H, 0)
        out_c = spec.out_channels
        self.put("output", "output", ("output", f"{h}×{w}×{out_c}"), IO_W, BOX_H, 0)
        self._bands()
        self._conditioning()
        total = self.report
        title = f"{spec.name} at {h}×{w}"
        subtitle = (
            "not measured"
            if total is None
            else (
                f"{_fmt_params(total.params)} params · {_fmt_gmacs(total.gmacs)} GMACs "
                "(multiply-adds, batch 1: the DiT paper's 'GFLOPs')"
            )
        )
        other = None if total is None else total.other.get("embed, conditioning, head")
        notes = []
        if other:
            notes.append(
                f"embedding, conditioning, head: {_fmt_params(other['params'])} params,"
                f" {_fmt_gmacs(other['gmacs'])} GMACs"
            )
        # bands first so they are drawn behind the boxes
        self.elements.sort(key=lambda e: e.kind != "band")
        return Diagram(title, subtitle, self.elements, self.edges, notes)

    def _bands(self) -> None:
        for i in range(self.n):
            members = [e for e in self.elements if e.level == i and e.kind in ("blocks", "skip")]
            if i == 0:
                members += [
                    e for e in self.elements if e.kind in ("input", "patch", "head", "output")
                ]
            if not members:  # an empty level (no blocks): span its transitions
                members = [e for e in self.elements if e.level == i]
            x0 = min(e.x - e.w / 2 for e in members) - GAP / 2
            x1 = max(e.x + e.w / 2 for e in members) + GAP / 2
            lv = None if self.report is None else self.report.levels[i]
            gh, gw = self.grids[i]
            d_model = self.spec.levels[i].d_model
            blocks = [b for s in STACKS for b in self.spec.stack(i, s)]
            counts = list(
                dict.fromkeys(
                    str(n)
                    for b in blocks
                    if (n := attention_heads(b.attention, d_model, b.d_head)) is not None
                )
            )
            heads = f"{'/'.join(counts)} heads" if counts else "no attention heads"
            lines: tuple[str, ...] = (
                f"level {i} · {gh}×{gw} tokens",
                f"d_model {d_model} · {heads} · {len(blocks)} block"
                f"{'s' if len(blocks) != 1 else ''}",
            )
            if lv is not None:
                lines += (f"{_fmt_params(lv.params)} params · {_fmt_gmacs(lv.gmacs)} GMACs",)
            y0 = min(e.y - e.h / 2 for e in members) - 0.25
            y1 = max(e.y + e.h / 2 for e in members) + (1.0 if i == 0 else 0.45)
            self.elements.append(
                Element(
                    id=f"L{i}.band",
                    kind="band",
                    lines=lines,
                    x=(x0 + x1) / 2,
                    y=(y0 + y1) / 2,
                    w=x1 - x0,
                    h=y1 - y0,
                    level=i,
                    params=None if lv is None else lv.params,
                    gmacs=None if lv is None else lv.gmacs,
                )
            )

    def _conditioning(self) -> None:
        cond = self.spec.conditioning
        bottom = min(e.y - e.h / 2 for e in self.elements) - 0.25  # the lowest band's edge
        y_level = -(bottom - LANE_GAP - 0.7) / ROW
        self.cursor = 0.0
        sources: list[str] = []

        def put(id, kind, lines, w=COND_W):
            self.put(id, kind, lines, w, COND_H, y_level, flow=False)
            return id

        sources.append(put("cond.noise", "noise", _noise_text(cond.noise)))
        classes = cond.classes
        if classes is not None:
            cid = put("cond.classes", "classes", _classes_text(classes))
            if classes.inject == "vector":
                sources.append(cid)
        for k, a in enumerate(cond.aux):
            dims = f"{a.dims} dim{'s' if a.dims > 1 else ''},"
            sources.append(
                put(f"cond.aux{k}", "aux", (f"aux {a.name}", dims, f"{a.embed} features"))
            )
        if cond.mapping is not None:
            mid = put(
                "cond.mapping", "mapping", ("mapping network", f"depth {cond.mapping.depth}, GEGLU")
            )
            self.edges += [Edge(s, mid, "cond") for s in sources]
            sources = [mid]
        users = sorted({b.modulation.kind for _, _, _, b in self.spec.blocks()} - {"none"})
        to = tuple(modulation_text(_MODS[u]) for u in users) or ("no block modulated",)
        cid = put("cond.vector", "cond", (f"c (width {self.spec.cond_width}) →",) + to)
        self.edges += [Edge(s, cid, "cond") for s in sources]


_MODS = {
    "ada_ln_zero": S.AdaLNZero(),
    "ada_scale": S.AdaScale(),
    "shared_ada_ln_zero": S.SharedAdaLNZero(),
}


# --------------------------------------------------------------------------------------------
# differences between two specs


def _plain(value) -> str:
    return json.dumps(
        S.to_data(value, full=True) if isinstance(value, BaseModel) else value,
        sort_keys=True,
        default=str,
    )


def signatures(spec: S.ModelSpec, resolution=None) -> dict[tuple, str]:
    """What each drawn element shows, keyed by where it sits (levels by index): two specs'
    elements differ where their signatures differ."""
    resolution = cast(tuple[int, int], tuple(resolution or spec.input.resolution))
    grids = spec.token_grids(resolution)
    out: dict[tuple, str] = {
        ("input",): _plain(spec.input) + str(resolution),
        ("patch",): _plain(spec.patch) + _plain(spec.position),
        ("head",): _plain(spec.head),
        ("output",): str(spec.out_channels) + str(resolution),
        ("cond.noise",): _plain(spec.conditioning.noise),
        ("cond.classes",): _plain(spec.conditioning.classes),
        ("cond.mapping",): _plain(spec.conditioning.mapping),
        ("cond.vector",): str(spec.cond_width),
    }
    for k, a in enumerate(spec.conditioning.aux):
        out[(f"cond.aux{k}",)] = _plain(a)
    for i, lvl in enumerate(spec.levels):
        out[("band", i)] = f"{lvl.d_model} {grids[i]}"
        for which in STACKS:
            for j, blk in enumerate(spec.stack(i, which)):
                out[("block", i, which, j)] = _plain(blk) + str(lvl.d_model)
        out[("down", i)] = _plain(lvl.down)
        out[("up", i)] = _plain(lvl.up)
        out[("skip", i)] = _plain(lvl.skip)
    return out


def _element_keys(el: Element) -> list[tuple]:
    match el.kind:
        case "band":
            return [("band", el.level)]
        case "blocks":
            return [("block", el.level, el.stack, j) for j in range(el.first, el.first + el.count)]
        case "down" | "up" | "skip":
            return [(el.kind, el.level)]
        case _:
            return [(el.id,)]


def _remap(key: tuple, level_map: dict[int, int | None]) -> tuple | None:
    if len(key) > 1 and isinstance(key[1], int):
        j = level_map.get(key[1])
        return None if j is None else (key[0], j, *key[2:])
    return key


def mark_differences(
    diagram: Diagram,
    mine: dict[tuple, str],
    theirs: dict[tuple, str],
    level_map: dict[int, int | None],
) -> Diagram:
    """A copy of ``diagram`` with ``highlight`` set on every element whose signature differs
    from (or has no counterpart in) ``theirs``; ``level_map`` maps this spec's level indices
    to the other's."""
    out = []
    for el in diagram.elements:
        diff = False
        for key in _element_keys(el):
            other = _remap(key, level_map)
            if other is None or mine.get(key) != theirs.get(other):
                diff = True
                break
        out.append(replace(el, highlight=diff))
    return Diagram(diagram.title, diagram.subtitle, out, diagram.edges, diagram.notes)


def compare(
    a: S.ModelSpec,
    b: S.ModelSpec,
    resolution_a=None,
    resolution_b=None,
    report_a=None,
    report_b=None,
    measure: bool = True,
) -> tuple[Diagram, Diagram]:
    """The two layouts with what differs highlighted on each side."""
    da = layout(a, resolution_a, report_a, measure)
    db = layout(b, resolution_b, report_b, measure)
    pairs = align_levels(a, b)
    a_to_b = {ia: ib for ia, ib in pairs if ia is not None}
    b_to_a = {ib: ia for ia, ib in pairs if ib is not None}
    sa, sb = signatures(a, resolution_a), signatures(b, resolution_b)
    return mark_differences(da, sa, sb, a_to_b), mark_differences(db, sb, sa, b_to_a)


def attention_kinds(diagram: Diagram) -> Iterable[str]:
    """The attention kind of every drawn block, in forward order, one per block."""
    for e in diagram.find("blocks"):
        assert e.attention is not None  # every block box names its attention
        yield from [e.attention] * e.count
