"""The collapse diagnostics (core/diagnostics.py) as a person reads them: per-epoch rows and a summary.md section.

No torch here: the Dagster process and the report read recorded histories only.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .summary import RunSummary

# Model-level fields of an epoch's diagnostics, in display order, with their Dagster table types.
MODEL_COLUMNS = (
    ("epoch", "int"), ("zero_code_fraction", "float"), ("worst_zero_code_fraction", "float"),
    ("worst_zero_code_layer", "string"), ("dead_channels", "int"), ("out_channels", "int"),
    ("max_over_rms", "float"), ("worst_max_over_rms", "float"), ("worst_max_over_rms_layer", "string"),
    ("weight_rms", "float"), ("channel_norm_spread", "float"), ("bn_log_var_mismatch", "float"), ("worst_bn_log_var_mismatch", "float"), ("worst_bn_layer", "string"),
    ("oscillating_fraction", "float"), ("oscillation_frequency", "float"), ("seconds", "float"),
)
LAYER_COLUMNS = (
    ("name", "string"), ("bit_width", "int"), ("weights", "int"), ("out_channels", "int"),
    ("zero_code_fraction", "float"), ("dead_channels", "int"), ("max_over_rms", "float"), ("scale", "float"),
    ("weight_rms", "float"), ("channel_norm_spread", "float"), ("oscillating_fraction", "float"),
    ("oscillation_frequency", "float"),
)


def model_rows(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per epoch that recorded diagnostics: the epoch and its model-level summary."""
    return [{"epoch": record["epoch"], **record["diagnostics"]["model"]}
            for record in history if record.get("diagnostics")]


def last_diagnostics(history: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The diagnostics of the last epoch that recorded them."""
    return next((record["diagnostics"] for record in reversed(history) if record.get("diagnostics")), None)


def diagnostics_markdown(summaries: Sequence[RunSummary]) -> list[str]:
    """summary.md section: per seed's trajectory, the diagnostics at the live weights' peak and at the end."""
    lines = ["## Collapse diagnostics (live weights)", ""]
    # Both methods of a seed share one training, so the live weights' diagnostics are the same in both runs;
    # the baseline's history gives the live weights' mAP (an ema-only seed shows the EMA copy's).
    runs: dict[tuple[str, int], RunSummary] = {}
    for summary in sorted(summaries, key=lambda s: s.method != "baseline"):
        runs.setdefault((summary.variant, summary.seed), summary)
    rows = []
    for (variant, seed), summary in sorted(runs.items()):
        trained = [h for h in summary.history if h.epoch > 0 and h.diagnostics is not None and h.map50_95 is not None]
        if not trained:
            continue
        peak = max(trained, key=lambda h: h.map50_95)
        for role, record in (("peak", peak), ("end", trained[-1])):
            d = record.diagnostics.model
            rows.append(
                f"| {variant} | {seed} | {summary.method} | {role} {record.epoch} | {record.map50_95:.4f} "
                f"| {_pct(d.get('zero_code_fraction'))} ({d.get('worst_zero_code_layer', '-')} "
                f"{_pct(d.get('worst_zero_code_fraction'))}) | {d.get('dead_channels', '-')}/{d.get('out_channels', '-')} "
                f"| {_num(d.get('max_over_rms'), 1)} ({_num(d.get('worst_max_over_rms'), 1)}) "
                f"| {_num(d.get('weight_rms'), 4)} | {_num(d.get('channel_norm_spread'), 2)} "
                f"| {_num(d.get('bn_log_var_mismatch'), 3)} ({d.get('worst_bn_layer', '-')} "
                f"{_num(d.get('worst_bn_log_var_mismatch'), 3)}) | {_pct(d.get('oscillating_fraction'))} "
                f"| {_num(d.get('oscillation_frequency'), 4)} |"
            )
    if not rows:
        return lines + ["No run recorded diagnostics (runs from before they existed)."]
    return lines + [
        "Measured on each seed's live weights after every validation (core/diagnostics.py); averages over the "
        "layers at the lowest bit width, weighted by weight count. Signatures: zero codes and max/RMS rising "
        "(the step outgrows the bulk of the weights), the BN mismatch rising while the training loss is flat "
        "(running statistics no longer match the weights), the oscillating fraction rising, RMS(w) falling and "
        "the channel-norm spread widening (weight decay shrinking the channels a small gradient leaves alone).",
        "",
        "| variant | seed | mAP of | epoch | mAP50-95 | zero codes (worst layer) | dead channels "
        "| max/RMS median (worst) | RMS(w) median | channel-norm spread median "
        "| BN mean \\|log var ratio\\| (worst layer) | oscillating | mean osc. frequency |",
        "|---|---:|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|",
        *rows,
    ]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
