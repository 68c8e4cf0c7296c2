"""The showcase's summary (examples/experiments/shapes-showcase.sh, last stage): read the
reports' ``results.json`` under OUT and write ``OUT/summary.md`` -- per base and scale, the best
zero-shot single-pass row, the best multi-stage row and the best fine-tuned row (by label
accuracy; the best Fréchet distance beside it), each against the issue's targets:

* zero-shot (policies, training-time options, multi-stage): at 2x >= 90% of the base's own 1x
  accuracy, at 4x >= 75%, each with a Fréchet distance within 2x of real images there;
* with the small fine-tune: >= 95% at 2x.

First, one table of every method of base A (rows) zero-shot, after the same small fine-tune and
multi-stage at 2x and 4x (columns), from the zero-shot and the fine-tuned reports.

Usage: python examples/experiments/showcase_summary.py docs/extrapolation
Only the standard library: it reads the reports, it samples nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPORTS = {
    "shapes-zero-shot": "base A (`shapes-extrapolate.yaml`)",
    "shapes-finetuned": "base A (`shapes-extrapolate.yaml`)",
    "shapes-trainopts": "base B (`shapes-trainopts.yaml`: multi-resolution + random positions)",
}
TARGET = {2: 0.90, 4: 0.75}  # zero-shot, share of the base's 1x accuracy
TARGET_FINETUNED = 0.95  # at 2x


def category(row: dict) -> str:
    if row.get("kind") == "multi-stage":
        return "multi-stage"
    if " + fine-tune " in row["policy"]:
        return "fine-tuned"
    return "single-pass"


def meets(row: dict, base_acc: float, scale: int, cat: str) -> bool | None:
    """Whether a row meets its category's target at this scale (None: no target there)."""
    m = row["metrics"]
    share = m["accuracy"] / base_acc
    if cat == "fine-tuned":
        return share >= TARGET_FINETUNED if scale == 2 else None
    need = TARGET.get(scale)
    if need is None:
        return None
    return share >= need and m["frechet"] <= 2 * m["frechet_real"]


def target_text(scale: int, cat: str) -> str:
    if cat == "fine-tuned":
        return f"≥ {TARGET_FINETUNED:.0%} of 1×"
    return f"≥ {TARGET[scale]:.0%} of 1× and Fréchet ≤ 2× real"


def fmt_row(row: dict, base_acc: float) -> str:
    m = row["metrics"]
    lo, hi = m["accuracy_ci"]
    share = m["accuracy"] / base_acc
    fd, real = m["frechet"], m["frechet_real"]
    return (
        f"`{row['policy']}` | {m['accuracy']:.1%} [{lo:.1%}, {hi:.1%}] | **{share:.0%}** | "
        f"{fd:.1f} ({fd / real:.1f}× real {real:.1f}) | {m['count']}"
    )


def verdict(here: list[dict], best: dict, base_acc: float, scale: int, cat: str) -> str:
    """The target's verdict at this scale and category: met by the most accurate row, by
    another (the most accurate of those that meet it, named), or by none."""
    if meets(best, base_acc, scale, cat) is None:
        return ""
    text = target_text(scale, cat)
    if meets(best, base_acc, scale, cat):
        return f"**met** ({text})"
    others = [r for r in here if meets(r, base_acc, scale, cat)]
    if not others:
        return f"not met by any row ({text})"
    o = max(others, key=lambda r: r["metrics"]["accuracy"])
    om = o["metrics"]
    return (
        f"**met** by `{o['policy']}`: {om['accuracy']:.1%} (**{om['accuracy'] / base_acc:.0%}**), "
        f"Fréchet {om['frechet']:.1f} ({om['frechet'] / om['frechet_real']:.1f}× real) ({text})"
    )


def method_of(row: dict) -> tuple[str, str]:
    """``(method, category)`` of a row: ``core_patch + fine-tune new (200 steps)`` is
    ``core_patch`` fine-tuned, ``as_is + stages 16,32:0.5`` is ``as_is`` multi-stage."""
    cat = category(row)
    sep = {"fine-tuned": " + fine-tune ", "multi-stage": " + stages "}.get(cat)
    return (row["policy"].split(sep)[0] if sep else row["policy"]), cat


def base_of(data: dict, rows: list[dict]) -> dict:
    """The trained model's row: a policy bit-identical to it at its training resolution."""
    trained = tuple(data["trained_resolution"])
    noop = data.get("noop_at_training_resolution", {})
    return next(
        r
        for r in rows
        if tuple(r["resolution"]) == trained
        and (r["policy"] == "as_is" or noop.get(r["policy"], {}).get("status") == "identical")
    )


def scored_rows(data: dict) -> list[dict]:
    return [r for r in data["rows"] if r.get("metrics") and not r.get("error")]


def method_table(out: Path) -> list[str]:
    """Every method of base A in one table: per scale its zero-shot single-pass row, its
    fine-tuned row and its best multi-stage row (share of 1x accuracy, Fréchet against real);
    the best of each column in bold. Empty when the zero-shot report is missing."""
    cells: dict[str, dict[tuple[int, str], dict]] = {}
    base_acc = None
    scales: set[int] = set()
    for name in ("shapes-zero-shot", "shapes-finetuned"):
        path = out / name / "results.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = scored_rows(data)
        trained = tuple(data["trained_resolution"])
        if name == "shapes-zero-shot":
            base_acc = base_of(data, rows)["metrics"]["accuracy"]
        for r in rows:
            if tuple(r["resolution"]) == trained:
                continue
            scale = r["resolution"][0] // trained[0]
            scales.add(scale)
            method, cat = method_of(r)
            if name == "shapes-finetuned" and cat == "single-pass":
                continue  # the zero-shot rows come from the zero-shot report
            got = cells.setdefault(method, {})
            old = got.get((scale, cat))
            if old is None or r["metrics"]["accuracy"] > old["metrics"]["accuracy"]:
                got[(scale, cat)] = r
    if base_acc is None or not cells:
        return []
    cols = [(s, c) for s in sorted(scales) for c in ("single-pass", "fine-tuned", "multi-stage")]
    best = {
        col: max((m[col]["metrics"]["accuracy"] for m in cells.values() if col in m), default=None)
        for col in cols
    }
    head = {"single-pass": "zero-shot", "fine-tuned": "fine-tuned", "multi-stage": "multi-stage"}
    lines = [
        "## Every method of base A: zero-shot, fine-tuned, multi-stage",
        "",
        "Each cell: label accuracy as a share of the base's own 1× accuracy "
        f"({base_acc:.1%}), then the Fréchet distance as a multiple of real images' at that "
        "resolution; the best share of each column in bold. Fine-tuned: the method's policy "
        "applied, then the same small fine-tune at the target resolution "
        "([shapes-finetuned](shapes-finetuned/report.md)); multi-stage: the method's best chain "
        "([shapes-zero-shot](shapes-zero-shot/report.md)); – : not run.",
        "",
        "| method | " + " | ".join(f"{s}× {head[c]}" for s, c in cols) + " |",
        "| --- | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for method, got in cells.items():
        texts = []
        for col in cols:
            r = got.get(col)
            if r is None:
                texts.append("–")
                continue
            m = r["metrics"]
            share = f"{m['accuracy'] / base_acc:.0%}"
            if m["accuracy"] == best[col]:
                share = f"**{share}**"
            chain = f" ({r['stages']})" if col[1] == "multi-stage" else ""  # the runner's field
            texts.append(f"{share} · {m['frechet'] / m['frechet_real']:.1f}×{chain}")
        lines.append(f"| `{method}` | " + " | ".join(texts) + " |")
    return lines + [""]


def summary(out: Path) -> str:
    lines = [
        "# The showcase's summary",
        "",
        "Written by `examples/experiments/showcase_summary.py` from the reports beside it "
        "(`examples/experiments/shapes-showcase.sh`). Per base and scale: the best row by label "
        "accuracy in each category, its share of the same base's accuracy at its training "
        "resolution (16×16, `as_is`), and its Fréchet distance against that of as many real "
        "images. Targets (issue 29): zero-shot ≥ 90% at 2× and ≥ 75% at 4×, each with a Fréchet "
        "distance within 2× of real images; after the small fine-tune ≥ 95% at 2×. The paired "
        "tests between rows are in each report.",
        "",
    ]
    lines += method_table(out)
    for name, base in REPORTS.items():
        path = out / name / "results.json"
        if not path.exists():
            lines += [f"## {name}", "", f"(no `{path}`: that report was not run)", ""]
            continue
        data = json.loads(path.read_text())
        trained = tuple(data["trained_resolution"])
        rows = scored_rows(data)
        base_row = base_of(data, rows)
        bm = base_row["metrics"]
        base_acc = bm["accuracy"]
        lines += [
            f"## [{name}]({name}/report.md): {base}",
            "",
            f"At its training resolution {trained[0]}×{trained[1]}: "
            f"{base_acc:.1%} label accuracy (real images {bm['real_accuracy']:.1%}), "
            f"Fréchet {bm['frechet']:.2f} (real {bm['frechet_real']:.2f}).",
            "",
            "| scale | category | best by accuracy | accuracy [95% CI] | of 1× | Fréchet | "
            "samples | target | best by Fréchet |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        pictures = [(f"{trained[0]}² trained", base_row)]
        for res in sorted({tuple(r["resolution"]) for r in rows} - {trained}):
            scale = res[0] // trained[0]
            for cat in ("single-pass", "multi-stage", "fine-tuned"):
                here = [r for r in rows if tuple(r["resolution"]) == res and category(r) == cat]
                if not here:
                    continue
                best = max(here, key=lambda r: r["metrics"]["accuracy"])
                by_fd = min(here, key=lambda r: r["metrics"]["frechet"])
                label = "zero-shot single-pass" if cat == "single-pass" else cat
                lines.append(
                    f"| {scale}× ({res[0]}²) | {label} | "
                    + fmt_row(best, base_acc)
                    + f" | {verdict(here, best, base_acc, scale, cat)}"
                    + f" | `{by_fd['policy']}` {by_fd['metrics']['frechet']:.1f} |"
                )
                pictures.append((f"{res[0]}² {label}: `{best['policy']}`", best))
        lines.append("")
        shown = [(cap, r) for cap, r in pictures if r.get("grid")]
        if shown:  # the first images of each best row's scored samples, as the report shows them
            lines += [f"- {cap}<br>![{cap}]({name}/{r['grid']})" for cap, r in shown]
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: showcase_summary.py OUT (the folder of the showcase's reports)")
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"showcase_summary.py: {out} is not a folder; give the showcase's OUT folder")
        return 2
    try:
        text = summary(out)
    except (ValueError, KeyError, TypeError, StopIteration) as err:  # not the runner's JSON
        print(
            f"showcase_summary.py: a results.json under {out} is not an extrapolation report's "
            f"({type(err).__name__}: {err}); regenerate it with `ditkit extrapolate`"
        )
        return 2
    (out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
