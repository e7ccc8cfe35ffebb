"""The human-facing report: mAP50-95 curves per variant and the `summary.md` that embeds them.

matplotlib is imported inside the plotting function (Agg canvas, no pyplot state) so importing this
module stays cheap for the Dagster code location and is safe from worker threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from qat_assets.core.artifacts import atomic_path, write_json_atomic, write_text_atomic
from qat_assets.core.comparison import Comparison, deployment_markdown
from qat_assets.core.diagnostics_report import diagnostics_markdown
from qat_assets.core.gate import GateDecision
from qat_assets.core.summary import EpochRecord, RunSummary

# Methods get distinct colour families and line styles; seeds of one method get shades of its family.
_METHOD_STYLE = {"baseline": ("Oranges", "--", "o"), "ema": ("Blues", "-", "s")}


def plot_map_curves(
    summaries: Sequence[RunSummary],
    out_png: Path,
    title: str,
    *,
    fp_map50_95: float | None = None,
) -> Path:
    """Plot mAP50-95 per epoch for every run of one variant and write it atomically as PNG.

    One line per `method|seed` through its validated epochs (epoch 0 = PTQ); each run's QC result is a star
    one epoch after its final epoch (QC is applied to the final weights); the FP reference is a dashed
    horizontal line.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    runs = sorted(summaries, key=lambda s: (s.method, s.seed))
    for method in sorted({s.method for s in runs}):
        cmap_name, linestyle, marker = _METHOD_STYLE.get(method, ("Greys", ":", "^"))
        same_method = [s for s in runs if s.method == method]
        for i, summary in enumerate(same_method):
            colour = colormaps[cmap_name](0.5 + 0.45 * i / max(1, len(same_method) - 1))
            history = validated_epochs(summary)
            ax.plot([r.epoch for r in history], [r.map50_95 for r in history], linestyle=linestyle, marker=marker,
                    markersize=3, color=colour, label=f"{method} seed {summary.seed} ({summary.stability_qat.status})")
            if summary.qc is not None and history and math.isfinite(summary.qc.map50_95_after):
                ax.plot([history[-1].epoch + 1], [summary.qc.map50_95_after], marker="*", markersize=12,
                        linestyle="none", color=colour, markeredgecolor="black",
                        label=f"{method} seed {summary.seed} + QC")
    if fp_map50_95 is not None:
        ax.axhline(fp_map50_95, color="black", linestyle="--", linewidth=1, label=f"FP reference {fp_map50_95:.3f}")
    if not runs:
        ax.text(0.5, 0.5, "no runs yet", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(title)
    ax.set_xlabel("epoch (0 = PTQ; QC result at final epoch + 1)")
    ax.set_ylabel("mAP50-95")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    return out_png


def validated_epochs(summary: RunSummary) -> list[EpochRecord]:
    """The run's validated epochs in order: its curve is a line through them, not one broken at every epoch a
    sparse validation cadence (`qat_val_interval`) skipped."""
    return sorted((r for r in summary.history if r.map50_95 is not None), key=lambda r: r.epoch)


def qc_markdown(summaries: Sequence[RunSummary]) -> list[str]:
    """QC budget and how far gamma/beta moved, per run, then per layer (collapsed) for each run."""
    runs = sorted((s for s in summaries if s.qc is not None), key=lambda s: (s.variant, s.method, s.seed))
    if not runs:
        return ["No QC results yet."]

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    def top(qc, key):
        layer = max(qc.layers, key=lambda row: getattr(row, key), default=None)
        return "–" if layer is None else f"{getattr(layer, key):.4f} ({layer.name})"

    lines = [
        "The paper's one QC epoch over COCO at batch 16 is about 7,400 Adam steps at lr 1e-4; what QC can correct "
        "depends on that budget. Max |γ−1| and max |β| show how far it actually moved.",
        "",
        "| variant | run | steps | epochs | optimizer | lr | batch | calibration images | loss before → after "
        "| max \\|γ−1\\| (layer) | max \\|β\\| (layer) | mAP50-95 delta | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def outcome(qc):
        if qc.rejected:
            return f"{qc.rejected} ({qc.check_set} images), uncorrected model kept"
        if qc.check_loss_before is None:
            return "kept (not checked)"
        return f"kept ({qc.check_set} loss {qc.check_loss_before:.4f} → {qc.check_loss_after:.4f})"

    for s in runs:
        qc = s.qc
        lines.append(
            f"| {s.variant} | {s.partition_key} | {num(qc.steps, 'd')} | {num(qc.epochs, 'd')} | {qc.optimizer or '–'} "
            f"| {num(qc.lr, 'g')} | {num(qc.batch, 'd')} | {num(qc.calibration_images, 'd')} "
            f"| {num(qc.loss_before, '.4f')} → {num(qc.loss_after, '.4f')} | {top(qc, 'max_abs_gamma_minus_1')} "
            f"| {top(qc, 'max_abs_beta')} | {qc.delta:+.4f} | {outcome(qc)} |"
        )
    for s in runs:
        if not s.qc.layers:
            continue
        lines += ["", f"<details><summary>{s.variant} {s.partition_key}: per-layer QC movement</summary>", "",
                  "| layer | max \\|γ−1\\| | max \\|β\\| |", "| --- | --- | --- |"]
        lines += [f"| {row.name} | {row.max_abs_gamma_minus_1:.5f} | {row.max_abs_beta:.5f} |" for row in s.qc.layers]
        lines += ["", "</details>"]
    return lines


def render_summary_md(
    comparison: Comparison,
    gate: GateDecision,
    plot_paths: Mapping[str, Path],
    *,
    relative_to: Path | None = None,
    summaries: Sequence[RunSummary] = (),
) -> str:
    """The whole report as Markdown: evidence verdicts, gate decision with every reason, comparison tables,
    the QC budget and movement (from `summaries`), and plots.

    `plot_paths` maps variant -> PNG. Image links are made relative to `relative_to` (the folder
    summary.md is written to) so the report folder can be moved or opened anywhere; without it the paths
    are used as given.
    """
    evidence = comparison.evidence_lines() or ["no runs to judge yet"]
    lines = [
        "# W4A16 QAT of YOLOv10: does EMA + QC prevent the early-peak collapse?",
        "",
        "## Evidence",
        "",
        *(f"- **{line}**" for line in evidence),
        "",
        f"**{gate.headline()}**",
        "",
        f"The gate needs, for every validation variant, at least {gate.min_seeds} of the seeds "
        f"{', '.join(map(str, gate.seeds))} whose {gate.method} run is complete, comparable and stable.",
        "",
        *(f"- {reason}" for reason in gate.reasons),
        "",
        "## Rules",
        "",
        "- Metric: mAP50-95(B). Epoch 0 is the freshly quantized pretrained model (PTQ). Best and final are "
        "medians over a window of m validations (default 3, fewer if fewer were made): best is the highest "
        "running median over trained epochs, final the median of the last m. `+QC` / `+BN` rows replace the "
        "final value by one measurement of the fixed final weights.",
        "- `completed-failed`: collapsed (final < ratio × best trained), fell below PTQ (final < ratio × PTQ) "
        "or degenerate (PTQ, best and final at or near zero). `incomplete`: crashed, interrupted, diverged or "
        "fewer epochs than planned; never counted.",
        "- Runs compare only with equal dataset fingerprint, evaluation settings and training profile; "
        "non-comparable runs are flagged and left out of the means and the gate.",
        "- `+BN` rows: the same final weights as `+QC`, with BatchNorm statistics re-estimated on training "
        "batches (Nagel et al.), a statistics-only fix to hold QC against.",
        "- Evidence, per seed whose baseline collapsed (both runs complete and comparable): prevented when "
        "EMA+QC's final is at least ratio × that baseline's best and above the baseline's final by more than "
        "the paired margin; collapsed too below that line. The verdict needs a majority of those seeds and "
        "reports k/N with an exact one-sided sign test. QC is credited only where ema+QC − ema+BN is real.",
        "- Paired statistics: per seed the difference within the seed; over seeds its mean, standard error, "
        "95 % t-interval and exact two-sided sign-flip p. A difference is real only when the interval "
        "excludes 0.",
        "",
        "## Comparison",
        "",
        comparison.to_markdown(),
        "## QC budget and movement",
        "",
        *qc_markdown(summaries),
        "",
        "## mAP50-95 per epoch",
        "",
    ]
    if not plot_paths:
        lines.append("No plots were produced.")
    for variant, path in plot_paths.items():
        link = Path(os.path.relpath(path, relative_to)) if relative_to is not None else Path(path)
        lines += [f"### {variant}", "", f"![mAP50-95 per epoch, {variant}]({link.as_posix()})", ""]
    return "\n".join(lines).rstrip() + "\n"


@dataclass(frozen=True)
class ComparisonReport:
    """The files of one comparison: a plot per variant, summary.md and comparison.json."""

    plots: dict[str, Path]
    summary_md: Path
    comparison_json: Path


def write_comparison_report(
    comparison: Comparison,
    decision: GateDecision,
    summaries: Sequence[RunSummary],
    fp_map50_95: Mapping[str, float | None],
    variants: Sequence[str],
    out_dir: Path,
    onnx_results: Sequence[Mapping] = (),
) -> ComparisonReport:
    """Plot every variant's curves, then write summary.md (embedding them, and the deployable-model section)
    and comparison.json, atomically."""
    plots = {
        variant: plot_map_curves(
            [s for s in summaries if s.variant == variant], out_dir / f"{variant}_map50_95.png",
            f"{variant} W4A16 QAT: mAP50-95 per epoch", fp_map50_95=fp_map50_95.get(variant),
        )
        for variant in variants
    }
    summary_md = write_text_atomic(
        out_dir / "summary.md",
        render_summary_md(comparison, decision, plots, relative_to=out_dir, summaries=summaries)
        + "\n" + deployment_markdown(onnx_results) + "\n" + "\n".join(diagnostics_markdown(summaries)) + "\n",
    )
    comparison_json = write_json_atomic(out_dir / "comparison.json", comparison.to_dict())
    return ComparisonReport(plots, summary_md, comparison_json)
