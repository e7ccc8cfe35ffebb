"""Probe one regime for the `collapse` positive control, through the real core code (no Dagster).

    # FP start (embedded synthetic set, settings = profile + --set overrides):
    nice -n 10 python scripts/collapse_probe.py fp --name n128 --variant yolo10n --set pretrain_epochs=60
    # one baseline QAT run from that FP checkpoint:
    nice -n 10 python scripts/collapse_probe.py qat --fp n128 --seed 0 \
        --set weight_bit_width=4 keep_first_last_8bit=false per_channel_scales=false learned_scales=false \
              qat_optimizer=SGD qat_lr=0.01 qat_lrf=1 qat_epochs=40

Each run appends one JSON line to WORK/results.jsonl (settings, best/final mAP50-95, best epoch,
final/best, minutes, per-epoch diagnostics and +BN curves), which is what docs/collapse_search.md tabulates:
`table` (peak and end per probe) and `curves` (the trend, at evenly spaced epochs). WORK defaults to
/tmp/collapse_probe; the synthetic set is written there once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from qat_assets.core import pretrain
from qat_assets.core.artifacts import read_sidecar
from qat_assets.core.coco import SubsetResult, convert_coco_subset
from qat_assets.core.pretrain import run_pretrain
from qat_assets.core.qat import run_qat
from qat_assets.core.requests import PretrainRequest, QATRequest
from qat_assets.core.settings import load_settings
from qat_assets.core.synthetic import write_synthetic_coco


def parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = value
    return overrides


def dataset(work: Path, settings) -> SubsetResult:
    # The easy set keeps its folder names from before the hard variant existed.
    hard = "" if settings.synthetic_difficulty == "easy" else f"_{settings.synthetic_difficulty}"
    subset_dir = work / f"subset{settings.synthetic_image_size}{hard}"
    if (subset_dir / "subset.json").is_file():
        return SubsetResult.read(subset_dir)
    coco = work / f"synthetic{settings.synthetic_image_size}{hard}"
    if not coco.is_dir():
        write_synthetic_coco(
            coco, train_images=settings.synthetic_train_images, val_images=settings.synthetic_val_images,
            image_size=settings.synthetic_image_size, seed=settings.subset_seed, difficulty=settings.synthetic_difficulty,
        )
    return convert_coco_subset(
        coco, subset_dir, train_images=settings.train_images, val_images=settings.val_images,
        seed=settings.subset_seed, skip_bad_items=False, source="synthetic",
    )


def record(work: Path, row: dict) -> None:
    with open(work / "results.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=("fp", "qat", "table", "curves", "fp-table"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/collapse_probe"))
    parser.add_argument("--name", help="fp: name of the FP run folder")
    parser.add_argument("--variant", default="yolo10n")
    parser.add_argument("--fp", help="qat: name of the FP run to start from")
    parser.add_argument("--seed", type=int, default=0, help="qat: the QAT seed; fp: the FP seed (init and trainer)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); the ladder's workers use 1")
    parser.add_argument("--method", default="baseline", choices=("baseline", "ema"))
    parser.add_argument("--set", nargs="*", default=[], help="settings overrides key=value")
    parser.add_argument("--points", type=int, default=10, help="curves: epochs shown per probe, evenly spaced")
    args = parser.parse_args()

    if args.stage == "table":
        print_table(args.work)
        return
    if args.stage == "curves":
        print_curves(args.work, args.points)
        return
    if args.stage == "fp-table":
        print_fp_table(args.work)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "fp":
        # Probes only: the project's FP start always uses pretrain.PRETRAIN_SEED (0); another seed measures
        # how much a recipe's outcome depends on its random stream.
        pretrain.PRETRAIN_SEED = args.seed
    overrides = {"device": "cpu", "storage": str(args.work), **parse_overrides(args.set)}
    settings = load_settings(overrides)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    subset = dataset(work, settings)
    started, cpu_started = time.time(), time.process_time()
    if args.stage == "fp":
        out = work / "fp" / args.name
        result = run_pretrain(PretrainRequest(
            variant=args.variant, dataset_yaml=subset.dataset_yaml, dataset_fingerprint=subset.fingerprint,
            names=subset.class_names, train_images=subset.counts["train"]["images"], out_dir=out, settings=settings,
        ), log=lambda line: print(line, flush=True))
        # None for an epoch FP did not validate (pretrain_val_interval).
        history = [None if h["map50_95"] is None else round(h["map50_95"], 4) for h in result["history"]]
        record(work, {
            "stage": "fp", "name": args.name, "variant": args.variant, "overrides": args.set, "seed": args.seed,
            "map50_95": result["metrics"]["map50_95"], "plateau": result["plateau"], "history": history,
            "minutes": (time.time() - started) / 60,
            # CPU time of all threads: comparable between runs when other jobs share the cores.
            "cpu_minutes": (time.process_time() - cpu_started) / 60,
        })
        return
    fp = work / "fp" / args.fp
    sidecar = read_sidecar(fp / "pretrained.pt")
    tag = run_tag(args.set)
    out = work / "qat" / args.fp / f"{args.method}-{args.seed}-{tag}"
    trajectory = work / "qat" / args.fp / f"trajectory-{args.seed}-{tag}"  # shared by both methods
    result = run_qat(QATRequest(
        variant=sidecar["variant"], method=args.method, seed=args.seed, pretrained_checkpoint=fp / "pretrained.pt",
        pretrained_sha256=sidecar["sha256"], dataset_yaml=subset.dataset_yaml,
        dataset_fingerprint=subset.fingerprint, train_images=subset.counts["train"]["images"], out_dir=out,
        trajectory_dir=trajectory, settings=settings,
    ), log=lambda line: print(line, flush=True))
    trained = [h for h in result["history"] if h["epoch"] > 0]
    validated = [h for h in trained if h["map50_95"] is not None]  # QAT_QAT_VAL_INTERVAL may skip epochs
    best = max(validated, key=lambda h: h["map50_95"]) if validated else None
    final = validated[-1]["map50_95"] if validated else float("nan")
    record(work, {
        "stage": "qat", "fp": args.fp, "variant": sidecar["variant"], "method": args.method, "seed": args.seed,
        "overrides": args.set, "fp_map50_95": result["fp_map50_95"], "ptq": result["ptq_map50_95"],
        "best": best["map50_95"] if best else None, "best_epoch": best["epoch"] if best else None,
        "final": final, "final_over_best": final / best["map50_95"] if best and best["map50_95"] > 0 else None,
        "diverged_at": result["diverged_at_epoch"], "history": [None if h["map50_95"] is None else round(h["map50_95"], 4) for h in result["history"]],
        "oscillating": [round(h.get("oscillating_fraction", 0.0), 4) for h in trained],
        # The live weights' model-level collapse diagnostics (core/diagnostics.py) at the peak and at the end,
        # and per epoch: the curves a mechanism's signature is read from.
        "diagnostics": {"peak": model_diagnostics(best), "end": model_diagnostics(trained[-1] if trained else None)},
        "diagnostics_curve": [model_diagnostics(h) for h in trained],
        # mAP50-95 of the method's weights with BN re-estimated (bn_reestimate_every_eval), None where not measured:
        # mechanism 2's control, measured beside the same trajectory.
        "bn_reestimated": [bn_reestimated_map(h) for h in trained],
        "minutes": (time.time() - started) / 60,
        "cpu_minutes": (time.process_time() - cpu_started) / 60,
    })


def run_tag(overrides: list[str]) -> str:
    """A folder name for a set of overrides. A long one is cut and ends in a hash of the whole: two probes whose
    overrides differ only past the cut (as `qat_optimizer=Adam` and `=AdamW` at the end of a long list) must
    not share a trajectory folder."""
    tag = "-".join(overrides).replace("=", "") or "default"
    if len(tag) <= 150:
        return tag
    return f"{tag[:130]}-{hashlib.sha256(tag.encode()).hexdigest()[:12]}"


def bn_reestimated_map(record: dict) -> float | None:
    """An epoch record's mAP50-95 after BN re-estimation, or None (not measured that epoch)."""
    measured = record.get("bn_reestimated")
    return round(measured["map50_95"], 4) if measured else None


def model_diagnostics(record: dict | None) -> dict | None:
    """An epoch record's model-level diagnostics, or None (no record, or an epoch that did not validate)."""
    diagnostics = (record or {}).get("diagnostics")
    return diagnostics["model"] if diagnostics else None


def print_table(work: Path) -> None:
    """The QAT rows of WORK/results.jsonl as the markdown table of docs/collapse_search.md, with the model-level
    collapse diagnostics at the peak → at the end (rows from before the diagnostics show "-")."""
    print("| variant | settings | seed | FP | PTQ | best (epoch) | final | final/best | collapsed | min "
          "| +BN at peak → end | zero codes | dead channels | max/RMS median | RMS(w) median | channel-norm spread "
          "| BN mean abs log var ratio | oscillating | mean osc. freq. |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|---|---|---|---|---|---|---|---|")
    for line in (work / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["stage"] != "qat":
            continue
        ratio = row["final_over_best"]
        collapsed = ratio is not None and ratio < 0.5
        print(
            f"| {row['variant']} | {' '.join(row['overrides'])} | {row['seed']} | {row['fp_map50_95']:.3f} | "
            f"{row['ptq']:.3f} | {row['best']:.3f} ({row['best_epoch']}) | {row['final']:.3f} | "
            f"{ratio:.2f} | {'yes' if collapsed else 'no'} | {row['minutes']:.1f} | {bn_reestimated_cell(row)} | "
            f"{diagnostics_cells(row)} |"
        )


def bn_reestimated_cell(row: dict) -> str:
    """The +BN mAP50-95 at the peak epoch → at the last epoch it was measured, or "-"."""
    curve = row.get("bn_reestimated") or []
    measured = [value for value in curve if value is not None]
    if not measured:
        return "-"
    peak = curve[row["best_epoch"] - 1] if row["best_epoch"] and row["best_epoch"] <= len(curve) else None
    return f"{'-' if peak is None else format(peak, '.3f')} → {measured[-1]:.3f}"


DIAGNOSTIC_CELLS = (  # model-level field, format
    ("zero_code_fraction", ".3f"), ("dead_channels", "d"), ("max_over_rms", ".1f"), ("weight_rms", ".4f"),
    ("channel_norm_spread", ".2f"), ("bn_log_var_mismatch", ".3f"), ("oscillating_fraction", ".4f"),
    ("oscillation_frequency", ".4f"),
)


def diagnostics_cells(row: dict) -> str:
    """'peak → end' per diagnostic, as table cells."""
    peak, end = (row.get("diagnostics", {}).get(role) or {} for role in ("peak", "end"))

    def cell(key: str, spec: str) -> str:
        if key not in peak or key not in end:
            return "-"
        return f"{format(peak[key], spec)} → {format(end[key], spec)}"

    return " | ".join(cell(key, spec) for key, spec in DIAGNOSTIC_CELLS)


def print_curves(work: Path, points: int) -> None:
    """Per QAT probe, the live weights' mAP, its +BN twin and the model-level diagnostics at `points` evenly
    spaced epochs (the last included): the trend a mechanism's signature is read from."""
    for line in (work / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        curve = row.get("diagnostics_curve") if row["stage"] == "qat" else None
        if not curve:
            continue
        print(f"\n{row['variant']} seed {row['seed']}: {' '.join(row['overrides'])}")
        print("| epoch | mAP50-95 | +BN | zero codes | dead channels | max/RMS | RMS(w) | channel-norm spread "
              "| BN mismatch | oscillating |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        epochs = sorted({max(1, round(i * len(curve) / points)) for i in range(1, points + 1)} | {1})
        for epoch in epochs:
            d, value, bn = curve[epoch - 1] or {}, row["history"][epoch], (row.get("bn_reestimated") or [None] * epoch)[epoch - 1]
            cells = [f"{value:.3f}" if value is not None else "-", f"{bn:.3f}" if bn is not None else "-"]
            cells += [format(d[key], spec) if key in d else "-" for key, spec in DIAGNOSTIC_CELLS[:-1]]
            print(f"| {epoch} | {' | '.join(cells)} |")


def print_fp_table(work: Path) -> None:
    """The FP rows of WORK/results.jsonl as the markdown table of docs/fp_recipe.md.

    s/epoch is the median wall time of an epoch (training and validation). A run that never left mAP 0
    "passes" the gain test trivially, so it counts as at plateau only above 0.01 mAP50-95.
    """
    print("| name | variant | settings | epochs | s/epoch | min (CPU min) | final mAP50-95 | best | "
          "10-epoch gain | at plateau |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for line in (work / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["stage"] != "fp":
            continue
        fp_dir = work / "fp" / row["name"]
        history = json.loads((fp_dir / "run" / "history.json").read_text()) if (fp_dir / "run" / "history.json").is_file() else []
        seconds = sorted(h["seconds"] for h in history if h.get("seconds"))
        per_epoch = f"{seconds[len(seconds) // 2]:.1f}" if seconds else "-"
        plateau = row["plateau"]
        passed = bool(plateau["at_plateau"]) and row["map50_95"] > 0.01
        cpu = f" ({row['cpu_minutes']:.1f})" if "cpu_minutes" in row else ""
        print(
            f"| {row['name']} | {row['variant']} | {' '.join(row['overrides'])} | {len(row['history'])} | {per_epoch} | "
            f"{row['minutes']:.1f}{cpu} | {row['map50_95']:.3f} | {max(v for v in row['history'] if v is not None):.3f} | "
            f"{plateau['gain']:+.4f} | {'yes' if passed else 'no'} |"
        )


if __name__ == "__main__":
    main()
