"""`qat-ladder`: the whole yolo10n/yolo10s validation ladder against the persistent instance.

Runs the same jobs the UI and the schedule run, through Dagster's multiprocess executor and the `gpu`
pool of the instance in DAGSTER_HOME: the foundation (dataset, calibration set, FP checkpoints), one
run per method|seed partition (QAT, QC, verdict for both variants), then the comparison and the gate.
Ends by printing the comparison and the gate decision; `dagster dev -w workspace.yaml` afterwards
shows every run and materialization.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from dagster import DagsterInstance, execute_job, reconstructable

from qat_assets.core import layout
from qat_assets.core.settings import METHODS, load_settings
from qat_assets.definitions import defs
from qat_assets.defs.variant.partitions import partition_key

INSTANCE_YAML = """\
# Written by qat-ladder. Heavy steps share the `gpu` pool: one at a time by default.
# With N GPUs, raise default_limit to N and set QAT_GPU_IDS (README, "Several GPUs").
concurrency:
  pools:
    default_limit: 1
telemetry:
  enabled: false
"""
RUN_CONFIG = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
# A gate that does not pass fails only its blocking check: that is a result, not a broken ladder.
GATE_CHECK_STEP = "gate_gate_passed"


def foundation_job():
    return defs.resolve_job_def("foundation_job")


def validation_partition_job():
    return defs.resolve_job_def("validation_partition_job")


def decision_job():
    return defs.resolve_job_def("decision_job")


def prepare_instance_home() -> Path:
    """DAGSTER_HOME (default ./.dagster_home), with the pool limit configured on first use."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path(".dagster_home").absolute())))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.is_file():
        config.write_text(INSTANCE_YAML)
    return home


def failed_steps(result) -> set[str]:
    return {event.step_key for event in result.all_events if event.is_step_failure}


def worker_seconds(instance: DagsterInstance, run_id: str) -> float:
    """Seconds the heavy workers reported for a run (training and evaluation, not orchestration)."""
    total = 0.0
    for record in instance.get_records_for_run(run_id).records:
        materialization = record.event_log_entry.asset_materialization
        if materialization is not None and "wall_time_s" in materialization.metadata:
            total += float(materialization.metadata["wall_time_s"].value)
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-ladder", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-foundation", action="store_true", help="reuse the dataset and FP checkpoints")
    args = parser.parse_args(argv)
    home = prepare_instance_home()
    settings = load_settings()
    print(f"qat-ladder: profile {settings.profile}, seeds {list(settings.seeds)}, instance {home}", flush=True)
    plan = [] if args.skip_foundation else [("foundation", foundation_job, None)]
    plan += [("QAT+QC+verdict", validation_partition_job, partition_key(m, s)) for m in METHODS for s in settings.seeds]
    plan += [("comparison+gate", decision_job, None)]

    failures: list[str] = []
    started = time.time()
    heavy = 0.0
    with DagsterInstance.get() as instance:
        for index, (label, job, key) in enumerate(plan, start=1):
            title = f"[{index}/{len(plan)}] {label}" + (f" {key}" if key else "")
            print(f"\n=== {title}", flush=True)
            run_started = time.time()
            tags = {"qat-ladder": "true", **({"dagster/partition": key} if key else {})}
            result = execute_job(
                reconstructable(job), instance=instance, run_config=RUN_CONFIG, raise_on_error=False, tags=tags
            )
            heavy += worker_seconds(instance, result.run_id)
            status = "ok" if result.success else "FAILED"
            print(f"=== {title}: {status} in {time.time() - run_started:.0f}s (run {result.run_id})", flush=True)
            if not result.success and failed_steps(result) != {GATE_CHECK_STEP}:
                failures.append(f"{title} (run {result.run_id})")

    total = time.time() - started
    print_outcome(settings.artifact_root())
    print(f"\nwall time {total / 60:.1f} min, of which heavy workers {heavy / 60:.1f} min "
          f"and Dagster/process overhead {(total - heavy) / 60:.1f} min")
    print_evidence(settings.artifact_root())
    if failures:
        print("runs that failed (see `dagster dev -w workspace.yaml`):\n  " + "\n  ".join(failures))
        return 1
    return 0


def print_outcome(root: Path) -> None:
    comparison = layout.comparison_dir(root) / "comparison.json"
    if comparison.is_file():
        from qat_assets.core.comparison import Comparison

        print("\n" + Comparison.from_dict(json.loads(comparison.read_text())).to_markdown())
        print(f"\nfull report: {layout.comparison_dir(root) / 'summary.md'}")
    gate = layout.gate_file(root)
    if gate.is_file():
        from qat_assets.core.gate import GateDecision

        decision = GateDecision.from_dict(json.loads(gate.read_text()))
        print("\n" + decision.headline())
        for reason in decision.reasons:
            print(f"  - {reason}")



def print_evidence(root: Path) -> None:
    """The evidence verdict per variant, as the very last lines: what the run says about the question."""
    gate = layout.gate_file(root)
    if gate.is_file():
        from qat_assets.core.gate import GateDecision

        decision = GateDecision.from_dict(json.loads(gate.read_text()))
        print("\nevidence" + ("" if decision.informative else " (UNINFORMATIVE: the gate's result proves nothing)") + ":")
        for line in decision.evidence_lines():
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
