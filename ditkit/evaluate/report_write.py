"""The extrapolation report's **write** part: ``results.json``, ``report.md``, ``report.html``
and the log-log cost plot, from the rows and comparisons (:mod:`ditkit.evaluate.report_measure`,
:mod:`ditkit.evaluate.report_compare`). Nothing here measures or tests.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ditkit import spec as S
from ditkit.errors import missing_text
from ditkit.evaluate.report_compare import OVERHEAD_FACTOR, latency_fits, slope
from ditkit.evaluate.report_measure import Resolution, Row
from ditkit.files import atomic_path, write_text
from ditkit.spec.sampling import Sampling

Curves = dict[str, list[tuple[Resolution, float]]]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _acc_cell(m: dict[str, Any]) -> str:
    ci = m.get("accuracy_ci")
    band = f" [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else ""
    return f"{_pct(m['accuracy'])}%{band} ({m['real_accuracy']:.0%})"


def _fd_cell(m: dict[str, Any]) -> str:
    ci = m.get("frechet_ci")
    band = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    return f"{m['frechet']:.2f}{band} ({m['frechet_real']:.2f})"


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _comparison_line(
    head: str,
    best: str,
    tests: list[dict[str, Any]],
    runner_up: Callable[[dict[str, Any], str], str],
    alpha: float,
) -> str:
    text = f"- **{head}:** best `{best}`"
    if not tests:
        return text + " (the only one scored here)."
    t = tests[0]
    sig = "significant" if t["p"] < alpha else "not significant"
    ties = [x["policy"] for x in tests if x["p"] >= alpha]
    text += f"; {runner_up(t, sig)}"
    return text + (
        ". Not significantly different from it (p ≥ 0.05): "
        + ", ".join(f"`{x}`" for x in ties)
        + "."
        if ties
        else "; better than every other row at p < 0.05."
    )


SCOPE_WORDS = {
    "zero-shot": ", zero-shot policies only",
    "single-pass": ", single-pass only",
    "multi-stage": ", multi-stage only",
}
"""How a comparison line names its scope (:func:`ditkit.evaluate.report_compare.compare`);
the ``all`` scope has no words."""


def comparison_lines(c: dict[str, Any], alpha: float = 0.05) -> list[str]:
    """Plain sentences for one resolution's :func:`compare` entry."""
    h, w = c["resolution"]
    only = SCOPE_WORDS.get(c.get("scope", "all"), "")
    acc = _comparison_line(
        f"{h}x{w}{only}, accuracy",
        c["best_accuracy"],
        c["accuracy_tests"],
        lambda t, sig: (
            f"ahead of the runner-up `{t['policy']}` by "
            f"{100 * t['difference']:.1f} points ({sig}, McNemar {_p(t['p'])}, "
            f"{c['count']} paired samples)"
        ),
        alpha,
    )
    fd = _comparison_line(
        f"{h}x{w}{only}, Fréchet",
        c["best_frechet"],
        c["frechet_tests"],
        lambda t, sig: (
            f"the runner-up `{t['policy']}` is {t['difference']:.2f} higher (95% "
            f"interval [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}], {sig}, "
            f"paired bootstrap {_p(t['p'])})"
        ),
        alpha,
    )
    return [acc, fd]


def write_report(
    spec: S.ModelSpec,
    rows: list[Row],
    curves: Curves,
    out: Path,
    noop: dict[str, dict[str, Any]] | None = None,
    comparisons: list[dict[str, Any]] | None = None,
    sampling: Sampling | None = None,
    latency_batch: int = 1,
) -> None:
    """Write ``results.json``, ``report.md``, ``report.html`` and ``cost.png`` (when matplotlib
    is installed) into ``out`` for the rows of ``spec``'s report."""
    noop, comparisons = noop or {}, comparisons or []
    lat = latency_fits(rows)
    results: dict[str, Any] = {
        "spec": spec.name,
        "trained_resolution": list(spec.input.resolution),
        "sampling": sampling.recorded() if sampling else {},
        "rows": [asdict(r) for r in rows],
        "noop_at_training_resolution": noop,
        "comparisons": comparisons,
        "curves": {k: [[list(r), g] for r, g in v] for k, v in curves.items()},
        "slopes": {k: slope(v) for k, v in curves.items()},
        "latency_slopes": {k: v["slope"] for k, v in lat.items()},
        "latency_fit": lat,
        "latency_batch": latency_batch,
    }
    write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    plot = _plot(curves, out / "cost.png")

    def cell(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    h0, w0 = spec.input.resolution
    scored = [r for r in rows if r.metrics]
    staged = [r for r in rows if r.kind == "multi-stage"]
    md = [f"# Resolution extrapolation: {spec.name}", "", f"Trained at {h0}x{w0}."]
    if sampling:
        md[-1] += f" Samples: `{sampling.sampler}`, {sampling.steps} steps, seed {sampling.seed}"
        md[-1] += (
            ", no guidance" if sampling.cfg_scale == 1.0 else f", cfg-scale {sampling.cfg_scale}"
        )
        if sampling.extras():  # a schedule, sigma range, eta, ... of its own
            md[-1] += f" ({', '.join(sampling.extras())})"
        md[-1] += "."
    md += [
        "",
        "GMACs are forward multiply-adds at batch 1 (the DiT paper's GFLOPs); latency is "
        f"the median of 3 forwards at batch {latency_batch}; peak MiB (same batch) is the "
        "most tensor memory alive at "
        "once during one forward above what was alive before (CUDA: the allocator's peak; "
        "CPU: PyTorch's allocator events under `torch.profiler`).",
    ]
    if scored:
        counts = sorted({(r.resolution, r.metrics.get("count")) for r in scored})
        md += [
            "",
            "Metrics on fixed-seed class-conditional samples (labels cycling through the "
            "classes; the same noise and labels for every row of a resolution, so rows are "
            "compared pair by pair): "
            + ", ".join(f"{n} per cell at {h}x{w}" for (h, w), n in counts)
            + ". *Accuracy* "
            "is the fraction a classifier trained on real images at that resolution labels as "
            "the requested class, with its 95% Wilson interval and, in brackets, the "
            "classifier's accuracy on held-out real images. *Fréchet* is the Fréchet "
            "distance between the classifier's hidden features of the samples and of real "
            "images, with a 95% bootstrap interval (resampling the samples) and, in brackets, "
            "the same distance for as many held-out real images (what a perfect generator "
            "would score at this sample size).",
        ]
    if staged:
        md += [
            "",
            "Rows named `POLICY + stages CHAIN` are **multi-stage**: sampled through the "
            "chain's stages (`RES[:SIGMA[:STEPS]]`: a draft at the first stage's resolution "
            "from pure noise, then per stage enlarged, re-noised to SIGMA and refined; the "
            "guide *Multi-stage sampling*) by the policy's model for the row's resolution, "
            "with the same seed and labels as the single-pass rows. Their GMACs and params are "
            "that model's, per forward; they are not timed again (the policy's single-pass row "
            "at the same resolution times the same network).",
        ]
    base = next(
        (
            r
            for r in scored
            if tuple(r.resolution) == (h0, w0) and r.same_as is None and r.policy == "as_is"
        ),
        None,
    )
    if base is not None:
        m = base.metrics
        ratio = m["accuracy"] / m["real_accuracy"] if m["real_accuracy"] else float("nan")
        md += [
            "",
            f"**The trained model at its training resolution** ({h0}x{w0}, `as_is`): "
            f"{_pct(m['accuracy'])}% label accuracy, {ratio:.0%} of the real-image "
            f"classifier's {_pct(m['real_accuracy'])}%; Fréchet {m['frechet']:.2f} against "
            f"{m['frechet_real']:.2f} for real images. Every other row is this model adapted.",
        ]
    head = "| policy | resolution | GMACs | params | latency ms | peak MiB | re-initialised |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
    if scored:
        head += " accuracy % [95% CI] (real) | Fréchet [95% CI] (real) |"
        rule += " ---: | ---: |"
    md += ["", head + " note |", rule + " --- |"]
    for r in rows:
        line = (
            f"| `{r.policy}` | {r.resolution[0]}x{r.resolution[1]} | {cell(r.gmacs, '.2f')} "
            f"| {r.params:,} | {cell(r.latency_ms, '.1f')} | {cell(r.peak_mib, '.1f')} "
            f"| {r.reinitialised} |"
        )
        if scored:
            m = r.metrics
            line += f" {_acc_cell(m)} | {_fd_cell(m)} |" if m else " - | - |"
        note = r.error or (
            f"bit-identical to the trained model: the samples of `{r.same_as}`" if r.same_as else ""
        )
        md.append(line + f" {note} |")
    if noop:
        md += [
            "",
            "## Each policy at the training resolution",
            "",
            f"Every policy applied at {h0}x{w0} and compared with the trained model on fixed "
            "inputs (batch 3, σ = 0.1, 1, 10): *identical* means every output bit is equal; "
            "*no-op* equal to float rounding (≤ 1e-5 of the output's scale); anything else "
            "is marked.",
            "",
            "| policy | at the training resolution | max abs difference |",
            "| --- | --- | ---: |",
        ]
        for label, chk in noop.items():
            status = chk["status"]
            shown = {
                "identical": "identical (exact no-op)",
                "no-op": "no-op (float rounding)",
                "changes the model": "**NOT a no-op: changes the model**",
                "invalid": f"**cannot be applied**: {chk.get('detail', '')}",
            }[status]
            md.append(f"| `{label}` | {shown} | {cell(chk.get('max_abs_diff'), '.3g')} |")
    if comparisons:
        md += [
            "",
            "## Which policy is best",
            "",
            "Per resolution, over the rows scored there (zero-shot policies and fine-tuned "
            "checkpoints), each compared with the best on the same samples: McNemar's exact "
            "test for accuracy, a paired bootstrap of the Fréchet difference (significant: "
            "p < 0.05, two-sided, not corrected for the number of rows). Where fine-tuned "
            "rows take part, the zero-shot policies are also ranked among themselves "
            "(*zero-shot policies only*): the choice without any training.",
        ]
        if any(c.get("scope") == "multi-stage" for c in comparisons):
            md[-1] += (
                " Where multi-stage rows take part, the best single-pass row and the best "
                "multi-stage row are also named apart (*single-pass only*, *multi-stage "
                "only*), each tested against the others of its kind."
            )
        md += [""] + [line for c in comparisons for line in comparison_lines(c)]
    md += ["", "## Cost vs pixels (log-log slopes)", ""]
    md += [f"- {k}: GMACs slope {s:.3f}" for k, s in results["slopes"].items() if s is not None]
    for k, v in lat.items():
        over = ", ".join(f"{h}x{w}" for h, w in v["overhead_bound"])
        if v["slope"] is not None:
            span = " to ".join(
                f"{h}x{w}" for h, w in (v["compute_bound"][0], v["compute_bound"][-1])
            )
            md.append(
                f"- {k}: measured latency slope {v['slope']:.3f} over the compute-bound "
                f"points ({span})" + (f"; overhead-bound at {over}" if over else "")
            )
        elif len(v["compute_bound"]) + len(v["overhead_bound"]) >= 2:
            md.append(
                f"- {k}: no latency slope: "
                + (
                    f"overhead-bound at {over} (time per GMAC more than {OVERHEAD_FACTOR}x the "
                    "best point's: per-call overhead, not compute)"
                    if over
                    else "the compute-bound points span less than 4x in pixels"
                )
            )
    if plot:
        md += ["", "![cost](cost.png)"]
    else:
        md += ["", f"(no cost plot: {missing_text('matplotlib', 'the cost plot')})"]
    grids = [r for r in rows if r.grid]
    if grids:
        md += ["", "## Samples (fixed seed)", ""]
        res_list = sorted({r.resolution for r in grids})
        md.append("| policy | " + " | ".join(f"{h}x{w}" for h, w in res_list) + " |")
        md.append("| --- |" + " --- |" * len(res_list))
        for pol in dict.fromkeys(r.policy for r in grids):
            cells = {r.resolution: r.grid for r in grids if r.policy == pol}
            md.append(
                f"| `{pol}` | "
                + " | ".join(
                    f"![{pol} {h}x{w}]({cells[(h, w)]})" if (h, w) in cells else "-"
                    for h, w in res_list
                )
                + " |"
            )
    write_text(out / "report.md", "\n".join(md) + "\n")
    write_text(out / "report.html", _html("\n".join(md)))


def _plot(curves: Curves, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, pts in curves.items():
        if not pts:
            continue
        xs = [r[0] * r[1] for r, _ in pts]
        ys = [g for _, g in pts]
        s = slope(pts)
        ax.plot(xs, ys, marker="o", label=f"{name}" + (f" (slope {s:.2f})" if s else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pixels (H x W)")
    ax.set_ylabel("GMACs per forward (batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", frameon=True)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return True


def _html(markdown: str) -> str:
    """A minimal Markdown -> HTML for the report's own constructs (headings, paragraphs, lists,
    tables, images, code, **strong** and *emphasis*), so the report opens in a browser as a page
    without extra packages. Figures are shown at their natural size up to the page width."""

    def inline(text: str) -> str:
        text = html.escape(text, quote=False)
        text = re.sub(
            r"!\[([^\]]*)\]\(([^)]+)\)",
            r'<img alt="\1" src="\2" style="max-width:100%;height:auto">',
            text,
        )
        text = re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', text)
        parts = re.split(r"(`[^`]+`)", text)  # no emphasis inside code spans
        for i, part in enumerate(parts):
            if part.startswith("`") and part.endswith("`") and len(part) > 1:
                parts[i] = f"<code>{part[1:-1]}</code>"
                continue
            part = re.sub(r"\*\*(?=\S)(.+?)(?<=\S)\*\*", r"<strong>\1</strong>", part)
            part = re.sub(
                r"(?<![\w*])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![\w*])", r"<em>\1</em>", part
            )
            parts[i] = part
        return "".join(parts)

    out = [
        "<!doctype html><meta charset=utf-8><title>ditkit extrapolation</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em;"
        "line-height:1.45}td,th{border:1px solid #ccc;padding:4px 6px}"
        "table{border-collapse:collapse;margin:.6em 0}th{background:#f3f3f3}"
        "img{display:block;margin:.5em 0}code{background:#f3f3f3;padding:0 3px}</style>",
    ]
    table: list[list[str]] = []
    in_list = False
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("</table>")
            table = []
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line:
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out)
