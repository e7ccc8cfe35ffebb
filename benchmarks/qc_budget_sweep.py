"""QC budget sweep (issue 26): share of a known injected error each candidate budget wins back, over seeds x CPU kernel families.

For each seed, a yolov10n is trained to a plateau at 64 px, quantized to W4A16, and a known per-channel gain and
offset error is injected before every BN (`qat_assets_tests/qc_known_error.py`, the setup of
`core/test_qc_budget.py`); each candidate QC budget then runs on it and the script records the share of the
error's calibration loss it won back. Each kernel family (PyTorch's ATEN_CPU_CAPABILITY) runs in its own
process: the machine's own, avx2 and default (no SIMD). Every process trains its own models, so a family's
realization includes its own training.

    YOLO_OFFLINE=1 python benchmarks/qc_budget_sweep.py --out /tmp/qc_sweep

prints the markdown table of docs/qc_budget.md (per candidate: cells that won back at least half, mean, min,
max, rejections). `--report /tmp/qc_sweep` prints it again from the saved results.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The known-error setup lives with the tests (qat_assets_tests is not an installed package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FAMILIES = ("machine", "avx2", "default")
# (optimizer, lr): SGD with momentum 0.9 at a few lrs, the paper's Adam 1e-4, Adam at a few lrs.
CANDIDATES = (("SGD", 1e-3), ("SGD", 3e-3), ("SGD", 1e-2), ("Adam", 1e-4), ("Adam", 3e-4), ("Adam", 1e-3))


def run_family(args: argparse.Namespace) -> None:
    """One kernel family: every seed, every candidate; one JSON line per cell, appended as it finishes."""
    import torch

    torch.set_num_threads(1)  # two cores shared by many processes: one thread each is fastest overall
    from qat_assets.core.qc import QCConfig
    from qat_assets_tests.qc_known_error import IMGSZ, qc_recovery, settled_quantized_model
    from qat_assets_tests.tiny_yolo_set import write_tiny_yolo_set

    capability = torch.backends.cpu.get_cpu_capability()
    out = Path(args.out) / f"{args.family}.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        data_yaml = write_tiny_yolo_set(Path(tmp), args.calibration_images, IMGSZ)
        for seed in args.seeds:
            started = time.perf_counter()
            clean = settled_quantized_model(data_yaml, steps=args.train_steps, seed=seed)
            for optimizer, lr in CANDIDATES:
                config = QCConfig(batch=args.batch, imgsz=IMGSZ, epochs=args.epochs, lr=lr, optimizer=optimizer,
                                  seed=seed)
                result = qc_recovery(clean, data_yaml, config, error_seed=seed)
                row = {"family": args.family, "capability": capability, "seed": seed, "optimizer": optimizer,
                       "lr": lr, "epochs": args.epochs, "batch": args.batch,
                       "calibration_images": args.calibration_images, **result}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            print(f"{args.family} ({capability}) seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)


def table(out: Path) -> str:
    rows = [json.loads(line) for path in sorted(out.glob("*.jsonl")) for line in path.read_text().splitlines()]
    if not rows:
        raise SystemExit(f"no results under {out}; run the sweep first")
    families = sorted({(r["family"], r["capability"]) for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    first = rows[0]
    lines = [
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) x kernel families "
        + ", ".join(f"{f} ({c})" for f, c in families)
        + f"; D_c {first['calibration_images']} images, batch {first['batch']}, {first['epochs']} epochs "
        f"({first['steps'] or '?'} steps). Premise: damaged / clean calibration loss "
        f"{min(r['damaged'] / r['clean'] for r in rows):.2f}-{max(r['damaged'] / r['clean'] for r in rows):.2f}.",
        "",
        "| optimizer | lr | cells won back >= 50 % | mean | min | max | QC rejected (loss rose) | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for optimizer, lr in CANDIDATES:
        cells = [r for r in rows if r["optimizer"] == optimizer and r["lr"] == lr]
        if not cells:
            continue
        won = [r["recovered"] for r in cells]
        finite = [w for w in won if math.isfinite(w)]
        diverged = sum(r["rejected"] == "diverged" for r in cells)
        rejected = sum(bool(r["rejected"]) and r["rejected"] != "diverged" for r in cells)
        name = "SGD, momentum 0.9" if optimizer == "SGD" else "Adam"
        lines.append(
            f"| {name} | {lr:g} | {sum(w >= 0.5 for w in won)}/{len(won)} | "
            f"{statistics.mean(finite):.0%} | {min(won):.0%} | {max(finite):.0%} | {rejected} | {diverged} |"
            if finite else f"| {name} | {lr:g} | 0/{len(won)} | – | – | – | {rejected} | {diverged} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/qc_budget_sweep", help="folder for the per-family JSONL results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--calibration-images", type=int, default=64, help="D_c size (embedded profile: 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=160, help="float training steps before quantization")
    parser.add_argument("--report", metavar="OUT", help="only print the table of an earlier sweep's results")
    parser.add_argument("--family", choices=FAMILIES, help=argparse.SUPPRESS)  # a worker process
    args = parser.parse_args()
    if args.report:
        print(table(Path(args.report)))
        return
    if args.family:
        run_family(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()
    print(" ".join(["YOLO_OFFLINE=1", "python", *sys.argv]), flush=True)
    workers = []
    for family in args.families:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "YOLO_OFFLINE": "1"}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if family != "machine":
            env["ATEN_CPU_CAPABILITY"] = family
        command = [sys.executable, __file__, "--family", family, "--out", str(out), "--seeds", *map(str, args.seeds),
                   "--calibration-images", str(args.calibration_images), "--batch", str(args.batch),
                   "--epochs", str(args.epochs), "--train-steps", str(args.train_steps)]
        workers.append(subprocess.Popen(["nice", "-n", "10", *command], env=env))
    failed = [w.args for w in workers if w.wait() != 0]
    if failed:
        raise SystemExit(f"a worker failed: {failed}")
    print(table(out))


if __name__ == "__main__":
    main()
