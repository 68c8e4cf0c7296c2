"""Accounting reproduces the papers' parameter and GFLOP tables (measured, not formulas)."""

import pytest

from ditkit import spec as S
from ditkit.builder import describe

# DiT paper, Table 4: Gflops and params (M) at 256x256, 32x32x4 latents
DIT_TABLE = {
    "dit-s-8": (0.36, 33),
    "dit-s-4": (1.41, 33),
    "dit-s-2": (6.06, 33),
    "dit-b-8": (1.42, 131),
    "dit-b-4": (5.56, 130),
    "dit-b-2": (23.01, 130),
    "dit-l-8": (5.01, 459),
    "dit-l-4": (19.70, 458),
    "dit-l-2": (80.71, 458),
    "dit-xl-8": (7.39, 676),
    "dit-xl-4": (29.05, 675),
    "dit-xl-2": (118.64, 675),
}


@pytest.mark.parametrize("name", DIT_TABLE)
def test_dit_presets_match_the_paper(name):
    gflops, params_m = DIT_TABLE[name]
    report = describe(S.load(f"examples/dit/{name}.yaml"))
    # "to the printed millions": the paper's column is rounded (B/2 130.51M prints as 130)
    assert abs(report.params / 1e6 - params_m) < 0.6
    # within 0.5%, or within the rounding of a number printed with two decimals
    assert abs(report.gmacs - gflops) <= max(0.005 * gflops, 0.005)


def test_dit_xl_2_exact():
    report = describe(S.load("examples/dit/dit-xl-2.yaml"))
    assert report.params == 675_129_632
    assert round(report.gmacs, 1) == 118.6
    assert report.trainable == 675_129_632 - 256 * 1152  # the sin-cos table is frozen


@pytest.mark.parametrize(
    "name,params_m,gmacs",
    [
        ("hdit-imagenet-128", 117.0, 31),
        ("hdit-ffhq-1024", 85.1, 206),
        ("hdit-imagenet-256", 557, 198),
    ],
)
def test_hdit_presets_match_table_6(name, params_m, gmacs):
    report = describe(S.load(f"examples/hdit/{name}.yaml"))
    digits = 1 if params_m < 200 else 0
    assert round(report.params / 1e6, digits) == params_m
    assert round(report.gmacs) == gmacs


def test_levels_and_rest_add_up():
    report = describe(S.hdit_ffhq_1024())
    total = sum(lv.gmacs for lv in report.levels) + sum(v["gmacs"] for v in report.other.values())
    assert abs(total - report.gmacs) < 1e-6
    assert (
        sum(lv.params for lv in report.levels) + sum(v["params"] for v in report.other.values())
        == report.params
    )
    assert [lv.grid for lv in report.levels][0] == (256, 256)


def test_attention_is_counted_algorithmically():
    """Neighborhood attention costs 2 n k^2 d (QK^T + AV) and grows like n; global attention
    costs 2 n^2 d and grows like n^2."""
    spec = S.load("examples/tiny/tiny-hdit-neighborhood.yaml")
    for res, scale in (((16, 16), 1), ((32, 32), 2)):
        n0 = (8 * scale) ** 2  # level-0 tokens: neighborhood 3x3, width 32, enc + dec blocks
        n1 = (4 * scale) ** 2  # level-1 tokens: global, width 64, one block
        expected = 2 * (2 * n0 * 9 * 32) + 2 * n1 * n1 * 64
        assert describe(spec, res).attention_gmacs * 1e9 == pytest.approx(expected, rel=1e-12)


def test_describe_rejects_an_invalid_resolution():
    with pytest.raises(S.SpecError, match="nearest valid"):
        describe(S.hdit_imagenet_128(), (100, 100))
