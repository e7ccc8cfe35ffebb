"""Which component did the work: the {baseline, EMA} × {nothing, +BN, +QC} grid and paired contrasts.

Every contrast is a per-seed difference within one seed (one training trajectory serves both methods, and
+BN / +QC fix the very weights of their run), summarized over seeds by `paired_statistics`:

- against the baseline: each outcome's final minus the baseline's final of the same seed;
- EMA alone: ema − baseline;
- BN alone: +BN's delta on the same weights (after − before re-estimation), on the EMA and the live weights;
- QC alone: +QC's delta on the EMA weights;
- QC beyond BN: ema+QC − ema+BN. With BN frozen, QC is a per-channel affine map that already contains
  what BN re-estimation corrects, so only this contrast says what QC adds.

BN and QC deltas are measured on the same final weights before and after the fix; the QAT rows' finals
are window medians (`stability.py`), so "ema+BN − ema" would mix a single measurement with a median.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Protocol

from pydantic import BaseModel

from qat_assets.core.paired_statistics import PairedDifference, paired_difference

METHODS = ("baseline", "ema")
FIXES = ("", "+BN", "+QC")  # nothing, BN re-estimation, QC


class Row(Protocol):
    """A complete, comparable comparison row."""

    method: str
    seed: int
    status: str
    final: float | None
    qc_delta: float | None
    bn_delta: float | None


class GridCell(BaseModel):
    """One outcome over seeds: mean and sample std of the final, how many seeds, how many failed."""

    method: str
    seeds: int
    failed: int
    mean_final: float | None
    std_final: float | None


def against_baseline(rows: Sequence[Row]) -> list[PairedDifference]:
    """Each non-baseline outcome's final minus the baseline's final of the same seed, over seeds."""
    labels = sorted({r.method for r in rows} - {"baseline"}, key=label_order)
    return [_contrast(rows, f"{label} - baseline", lambda by, s, label=label: _minus(by, s, label, "baseline"))
            for label in labels]


def contributions(rows: Sequence[Row]) -> list[PairedDifference]:
    """Each component's own part: EMA alone, BN alone, QC alone, QC beyond BN (contrasts with no seeds left out)."""
    out = [
        _contrast(rows, "EMA alone: ema - baseline", lambda by, s: _minus(by, s, "ema", "baseline")),
        _contrast(rows, "BN alone on EMA weights: ema+BN delta", lambda by, s: _delta(by, s, "ema+BN", "bn_delta")),
        _contrast(rows, "BN alone on live weights: baseline+BN delta",
                  lambda by, s: _delta(by, s, "baseline+BN", "bn_delta")),
        _contrast(rows, "QC alone on EMA weights: ema+QC delta", lambda by, s: _delta(by, s, "ema+QC", "qc_delta")),
        _contrast(rows, "QC beyond BN: ema+QC - ema+BN", lambda by, s: _minus(by, s, "ema+QC", "ema+BN")),
    ]
    return [c for c in out if c.n]


def grid(rows: Sequence[Row]) -> list[list[GridCell]]:
    """Rows baseline, EMA; columns nothing, +BN, +QC."""
    cells = []
    for method in METHODS:
        line = []
        for fix in FIXES:
            finals = [r.final for r in rows if r.method == method + fix and r.final is not None]
            line.append(GridCell(
                method=method + fix, seeds=len(finals),
                failed=sum(r.status == "completed-failed" for r in rows if r.method == method + fix),
                mean_final=statistics.fmean(finals) if finals else None,
                std_final=statistics.stdev(finals) if len(finals) > 1 else None,
            ))
        cells.append(line)
    return cells


def label_order(label: str) -> tuple[int, str]:
    known = ["baseline", "baseline+QC", "baseline+BN", "ema", "ema+QC", "ema+BN"]
    return (known.index(label) if label in known else len(known), label)


def _contrast(rows: Sequence[Row], name: str, difference: Callable[[dict, int], float | None]) -> PairedDifference:
    by = {(r.method, r.seed): r for r in rows}
    seeds = sorted({r.seed for r in rows})
    pairs = [(s, d) for s in seeds if (d := difference(by, s)) is not None]
    return paired_difference(name, [s for s, _ in pairs], [d for _, d in pairs])


def _minus(by: dict, seed: int, first: str, second: str) -> float | None:
    a, b = by.get((first, seed)), by.get((second, seed))
    if a is None or b is None or a.final is None or b.final is None:
        return None
    return a.final - b.final


def _delta(by: dict, seed: int, label: str, field: str) -> float | None:
    row = by.get((label, seed))
    return getattr(row, field) if row is not None else None
