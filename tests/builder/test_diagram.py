"""Architecture diagrams: the structure is checked from the layout's own data (what it placed:
levels, blocks, attention labels, transitions, skips, conditioning), the pictures for
determinism and content; every preset and tiny example lays out and draws."""

import itertools

import pytest

from ditkit import spec as S
from ditkit.builder import describe
from ditkit.builder.diagram import Diagram, attention_kinds, compare, layout
from ditkit.builder.diagram_render import draw_comparison, render
from ditkit.errors import UserError
from ditkit.spec.presets import PRESETS, preset
from tests.conftest import tiny_specs

FAMILIES = ("dit-xl-2", "hdit-imagenet-128", "mdit-b", "mpdit-xl")
MEASURED = ("dit-xl-2", "hdit-imagenet-128")
"""Measured (a meta-device build each): the two whose published totals the tests check."""


@pytest.fixture(scope="module")
def families() -> dict[str, tuple[S.ModelSpec, Diagram, object]]:
    out = {}
    for name in FAMILIES:
        spec = preset(name)
        report = describe(spec) if name in MEASURED else None
        out[name] = spec, layout(spec, report=report, measure=name in MEASURED), report
    return out


def runs_of(d: Diagram, level: int, stack: str) -> list[tuple[str, int, bool, str]]:
    return [
        (e.attention, e.count, e.cross_attention, e.lines[0])
        for e in d.find("blocks", level, stack)
    ]


# -------------------------------------------------------------------- structure, per family


def test_dit_xl_2(families):
    spec, d, _ = families["dit-xl-2"]
    assert [b.lines[0] for b in d.find("band")] == ["level 0 · 16×16 tokens"]
    assert "d_model 1152 · 16 heads · 28 blocks" in d.element("L0.band").lines[1]
    assert runs_of(d, 0, "middle") == [("global", 28, False, "global attention")]
    assert d.element("L0.middle.0").modulation == "ada_ln_zero"
    assert "16 heads · adaLN-Zero" in d.element("L0.middle.0").lines
    assert not d.find("down") and not d.find("up") and not d.find("skip")
    assert "+ sincos pos." in d.element("patch").lines
    assert "+ learned σ" in d.element("head").lines
    assert d.element("output").lines == ("output", "32×32×8")  # eps and sigma
    # DiT paper, Table 4: DiT-XL/2 675M params, 118.64 Gflops
    # (docs/spec/index.md: 675,129,632 / 118.62)
    assert d.subtitle.startswith("675.1M params · 118.6 GMACs")


def test_hdit_imagenet_128(families):
    spec, d, report = families["hdit-imagenet-128"]
    bands = d.find("band")
    assert [b.lines[0] for b in bands] == ["level 0 · 32×32 tokens", "level 1 · 16×16 tokens"]
    assert "d_model 384 · 6 heads · 4 blocks" in bands[0].lines[1]
    assert "d_model 768 · 12 heads · 11 blocks" in bands[1].lines[1]
    assert runs_of(d, 0, "encoder") == [("neighborhood", 2, False, "neighborhood 7×7")]
    assert runs_of(d, 0, "decoder") == [("neighborhood", 2, False, "neighborhood 7×7")]
    assert runs_of(d, 1, "middle") == [("global", 11, False, "global attention")]
    assert {e.modulation for e in d.find("blocks")} == {"ada_scale"}
    assert d.element("L0.down").lines == ("merge 2×2", "→ d 768")
    assert d.element("L0.up").lines == ("split 2×2", "→ d 384")
    assert d.element("L0.skip").variant == "lerp" and d.element("L0.skip").lines == ("lerp",)
    assert [e.kind for e in d.elements if e.id.startswith("cond.")] == [
        "noise",
        "classes",
        "aux",
        "mapping",
        "cond",
    ]
    assert d.element("cond.aux0").lines[0] == "aux aug_cond"
    assert "Fourier features" in d.element("cond.noise").lines
    # HDiT paper, Table 6: 117.0M params, 31 GFLOPs (docs/spec/index.md: 117,003,805 / 31.37)
    assert d.subtitle.startswith("117.0M params · 31.4 GMACs")
    # per level: describe's numbers, and they add up with the rest to the total
    assert [b.params for b in bands] == [lv.params for lv in report.levels]
    assert [b.gmacs for b in bands] == [lv.gmacs for lv in report.levels]
    other = report.other["embed, conditioning, head"]
    assert sum(b.params for b in bands) + other["params"] == 117_003_805


def test_mdit_b(families):
    """MDiT-B {M, N, K, L} = {2, 4, 4, 5}: 2 encoder and 4 decoder neighborhood blocks outside,
    a core of aggregate blocks interleaved with cross-attention blocks (K = 4), then 5 more."""
    spec, d, _ = families["mdit-b"]
    assert runs_of(d, 0, "encoder") == [("neighborhood", 2, False, "neighborhood 7×7")]
    assert runs_of(d, 0, "decoder") == [("neighborhood", 4, False, "neighborhood 7×7")]
    core = runs_of(d, 1, "middle")
    assert core == [
        ("global", 1, True, "global attention"),
        ("aggregate", 1, False, "aggregate 2×2"),
        ("global", 1, True, "global attention"),
        ("aggregate", 1, False, "aggregate 2×2"),
        ("global", 5, True, "global attention"),
    ]
    assert "18 heads · AdaRMS (gelu)" in d.element("L1.middle.1").lines
    assert "+ cross-attention" in d.element("L1.middle.0").lines
    assert d.element("L1.middle.0").modulation == "none"
    assert d.element("patch").lines[0] == "patch 1×1"
    assert d.element("cond.classes").lines[1:] == ("one token for", "cross-attention")
    # the core is drawn as a column (the hourglass's bottom): one x, descending y
    core_els = d.find("blocks", 1, "middle")
    assert len({e.x for e in core_els}) == 1
    assert [e.y for e in core_els] == sorted((e.y for e in core_els), reverse=True)


def test_mpdit_xl(families):
    """MPDiT-XL: a coarse 8x8 level (22 blocks) fed by its own 4x4 patch embedding of the
    input, an upsample block back to the 16x16 grid, added to the fine patch embedding, 6 fine
    blocks; class tokens as a 16-token prefix; FNO time embedding; shared adaLN."""
    spec, d, _ = families["mpdit-xl"]
    assert [b.lines[0] for b in d.find("band")] == [
        "level 0 · 16×16 tokens",
        "level 1 · 8×8 tokens",
    ]
    down = d.element("L0.down")
    assert (down.variant, down.lines[0]) == ("repatch", "repatch 4×4")
    edges = {(e.src, e.dst, e.kind) for e in d.edges}
    assert ("input", "L0.down", "flow") in edges  # from the input, not from level 0
    assert ("patch", "L0.skip", "skip") in edges  # the fine embedding is the skip
    assert d.element("L0.up").variant == "upsample"
    assert d.element("L0.skip").variant == "linear"
    assert runs_of(d, 0, "encoder") == []
    assert runs_of(d, 1, "middle") == [("global", 22, False, "global attention")]
    assert runs_of(d, 0, "decoder") == [("global", 6, False, "global attention")]
    assert {e.modulation for e in d.find("blocks")} == {"shared_ada_ln_zero"}
    assert d.element("cond.classes").lines[1] == "16 prefix tokens"
    assert d.element("cond.noise").lines[1] == "FNO embedding"
    assert "(shared adaLN)" in d.element("head").lines


# -------------------------------------------------------------------- invariants, every spec


def _all_specs():
    return [pytest.param(preset(n), id=n) for n in PRESETS] + [
        pytest.param(S.load(p), id=p.stem) for p in tiny_specs()
    ]


def _check_structure(spec: S.ModelSpec, d: Diagram) -> None:
    assert len(d.find("band")) == len(spec.levels)
    for i in range(len(spec.levels)):
        for which in ("encoder", "middle", "decoder"):
            blocks = spec.stack(i, which)
            drawn = [k for e in d.find("blocks", i, which) for k in [e.attention] * e.count]
            assert drawn == [b.attention.kind for b in blocks], (i, which)
    n_trans = len(spec.levels) - 1
    assert len(d.find("down")) == len(d.find("up")) == n_trans
    assert len(d.find("skip")) == sum(lvl.skip.kind != "none" for lvl in spec.levels[:-1])
    assert sum(1 for _ in attention_kinds(d)) == sum(1 for _ in spec.blocks())
    # nothing drawn on top of anything else (bands are backgrounds)
    boxes = [e for e in d.elements if e.kind != "band"]
    for a, b in itertools.combinations(boxes, 2):
        apart = abs(a.x - b.x) >= (a.w + b.w) / 2 - 1e-9 or abs(a.y - b.y) >= (a.h + b.h) / 2 - 1e-9
        assert apart, f"{a.id} overlaps {b.id}"
    # the data flows from the input through every block to the output
    ids = {e.id for e in d.elements}
    nxt: dict[str, list[str]] = {}
    for edge in d.edges:
        assert edge.src in ids and edge.dst in ids
        if edge.kind in ("flow", "skip"):
            nxt.setdefault(edge.src, []).append(edge.dst)
    seen, todo = set(), ["input"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += nxt.get(node, [])
    assert "output" in seen
    assert {e.id for e in d.find("blocks")} <= seen


@pytest.mark.parametrize("spec", _all_specs())
def test_every_spec_lays_out(spec):
    _check_structure(spec, layout(spec, measure=False))


@pytest.mark.parametrize("path", tiny_specs(), ids=lambda p: p.stem)
def test_every_tiny_example_lays_out_with_its_numbers(path):
    spec = S.load(path)
    report = describe(spec)
    d = layout(spec, report=report)
    _check_structure(spec, d)
    assert [b.params for b in d.find("band")] == [lv.params for lv in report.levels]
    assert [b.gmacs for b in d.find("band")] == [lv.gmacs for lv in report.levels]


@pytest.mark.parametrize("name", ["tiny-options", "tiny-mpdit-3level", "tiny-mdit"])
def test_tiny_examples_draw(name, tmp_path):
    """Three tiny examples that between them use every attention kind, every skip and both
    ways down and up; drawing all presets is the slow test below."""
    from PIL import Image

    from tests.conftest import EXAMPLES

    d = layout(S.load(EXAMPLES / "tiny" / f"{name}.yaml"), measure=False)
    out = render(d, tmp_path / f"{name}.png")
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.mark.slow
def test_every_preset_renders_to_svg(tmp_path):
    for name in PRESETS:
        d = layout(preset(name), measure=False)
        text = render(d, tmp_path / "p.svg").read_text()
        assert f"{name} at" in text


# -------------------------------------------------------------------- pictures


def test_svg_is_deterministic_and_keeps_text(families, tmp_path):
    _, d, _ = families["hdit-imagenet-128"]
    a = render(d, tmp_path / "a.svg").read_bytes()
    b = render(d, tmp_path / "b.svg").read_bytes()
    assert a == b
    text = a.decode()
    for label in (
        "neighborhood 7×7",
        "global attention",
        "level 1 · 16×16 tokens",
        "lerp",
        "merge 2×2",
        "mapping network",
    ):
        assert label in text
    assert "<dc:date>" not in text


def test_png_is_deterministic_and_page_sized(families, tmp_path):
    from PIL import Image

    _, d, _ = families["mpdit-xl"]
    a = render(d, tmp_path / "a.png").read_bytes()
    assert a == render(d, tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        w, h = im.size
    assert 600 < w < 1600 and 300 < h < 1200


def test_no_skip_draws_no_skip_path():
    from tests.conftest import EXAMPLES

    data = S.to_data(S.load(EXAMPLES / "tiny" / "tiny-options.yaml"))
    data["levels"][1]["skip"] = {"kind": "none"}
    spec = S.validate(data)
    d = layout(spec, measure=False)
    _check_structure(spec, d)
    assert [e.id for e in d.find("skip")] == ["L0.skip"]
    assert d.element("L0.skip").lines == ("concat",)
    assert not [e for e in d.edges if e.kind == "skip" and e.dst == "L1.skip"]
    # the way up leads straight into level 1's decoder
    assert any(e.src == "L1.up" and e.dst == "L1.decoder.0" for e in d.edges)


def test_layout_is_plain_data():
    import json

    d = layout(preset("mdit-b"), measure=False)
    data = json.loads(json.dumps(d.to_json()))
    kinds = [e["kind"] for e in data["elements"]]
    assert kinds.count("band") == 2 and kinds.count("blocks") == 7
    assert {"src": "L0.down", "dst": "L1.middle.0", "kind": "flow", "label": ""} in data["edges"]


def test_resolution_changes_the_grids():
    d = layout(preset("hdit-imagenet-128"), (256, 256), measure=False)
    assert [b.lines[0] for b in d.find("band")] == [
        "level 0 · 64×64 tokens",
        "level 1 · 32×32 tokens",
    ]
    with pytest.raises(S.SpecError, match="not divisible"):
        layout(preset("hdit-imagenet-128"), (130, 130), measure=False)


def test_bad_path_and_missing_matplotlib(families, tmp_path, monkeypatch):
    _, d, _ = families["dit-xl-2"]
    with pytest.raises(UserError, match=r"\.svg or \.png"):
        render(d, tmp_path / "a.pdf")
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(UserError, match=r"pip install 'ditkit\[diagram\]'"):
        render(d, tmp_path / "a.svg")
    assert not (tmp_path / "a.svg").exists()


# -------------------------------------------------------------------- differences


def test_add_levels_highlights_the_new_outer_level_only():
    from ditkit.runtime.extrapolate import adapt_spec

    a = preset("hdit-imagenet-128")
    b = adapt_spec(a, S.AddLevels(), (256, 256))
    da, db = compare(a, b, measure=False)
    # the original only differs in its input / output size
    assert {e.id for e in da.highlighted()} == {"input", "output"}
    # the adapted spec: all of the new level 0, nothing of the two levels it kept
    new = {e.id for e in db.highlighted()}
    assert {"L0.band", "L0.encoder.0", "L0.down", "L0.up", "L0.skip", "L0.decoder.0"} <= new
    assert not any(e.level in (1, 2) for e in db.highlighted())


def test_local_core_highlights_the_core_attention(tmp_path):
    from ditkit.runtime.extrapolate import adapt_spec

    a = preset("hdit-imagenet-128")
    b = adapt_spec(a, S.LocalCore(kernel_size=7), (128, 128))
    da, db, rows = draw_comparison(
        a, b, tmp_path / "d.svg", label_a="trained", label_b="local_core", measure=False
    )
    assert [r.path for r in rows] == ["levels[1].attention"]
    assert {e.id for e in da.highlighted()} == {"L1.middle.0"}
    assert {e.id for e in db.highlighted()} == {"L1.middle.0"}
    assert db.element("L1.middle.0").attention == "neighborhood"
    text = (tmp_path / "d.svg").read_text()
    assert "a: hdit-imagenet-128 at 128×128  (trained)" in text
    assert "b: hdit-imagenet-128 at 128×128  (local_core)" in text
    assert "levels[1].attention" in text and "differs from the other spec" in text


def test_a_block_default_change_highlights_the_blocks_that_inherit_it():
    a = S.load(tiny_specs()[0].parent / "tiny-options.yaml")
    data = S.to_data(a)
    data["block"]["ffn"] = {"kind": "geglu", "ratio": 2.0}
    b = S.validate(data)
    da, db = compare(a, b, measure=False)
    marked = {e.id for e in db.highlighted()}
    # level 1's decoder overrides the ffn per block: it is the only stack left alone
    assert "L1.decoder.0" not in marked
    assert {e.id for e in db.find("blocks")} - {"L1.decoder.0"} <= marked


# -------------------------------------------------------------------- docs pictures


@pytest.mark.parametrize("name", FAMILIES)
def test_committed_diagrams_show_the_current_presets(name):
    """``docs/diagrams/PRESET.svg`` (in the docs) says what the layout of the preset says
    today: every label of every element. Regenerate with
    ``ditkit describe PRESET --diagram docs/diagrams/PRESET.svg``."""
    from tests.conftest import ROOT

    svg = (ROOT / "docs" / "diagrams" / f"{name}.svg").read_text()
    d = layout(preset(name), measure=False)
    for e in d.elements:
        lines = e.lines[:2] if e.kind == "band" else e.lines
        if e.kind == "blocks":
            lines += (f"×{e.count}",)
        for line in lines:
            assert line in svg, f"{e.id}: {line!r} missing; regenerate the diagram"
