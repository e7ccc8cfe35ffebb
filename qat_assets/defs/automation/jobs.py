"""Asset jobs: the stages of the validation ladder, and the gated yolo10m runs.

Executors: a step of the dataset, per-variant, partition and decision jobs is either light (dataset,
verdict, comparison, gate: seconds at most) or waits on a worker process that does the heavy work
(warm_server.py), so those jobs run their steps in the run's own process, instead of paying a Python
start and a code-location load (seconds each, tens of seconds on a loaded machine) per step. Pools still
apply to in-process steps: with a `gpu` limit of N, N runs overlap, one heavy step each. The foundation
job (for the UI; qat-ladder runs the per-variant jobs) keeps one process per step so the FP starting
points of yolo10n and yolo10s train side by side when the pool allows. Those step processes are spawned,
not forked from multiprocessing's forkserver: a forkserver lives as long as the process that started it
and hands its children the environment it was started with, so in a long-lived process (a test session,
a notebook) later runs would see stale QAT_* and DAGSTER_PG_* values.
"""

from dagster import AssetSelection, define_asset_job, in_process_executor, multiprocess_executor

from qat_assets.core.settings import VALIDATION_VARIANTS, VARIANTS

# On the jobs whose runs do one heavy step at a time: the run queue launches at most the pool limit of them
# (qat-ladder's dagster.yaml), so a queued run is never launched in the instant between two heavy steps of a
# running one, only to wait for the slot (ladder L9: 32 s, its wait loop taking a core from the step).
HEAVY_RUN_TAG = "qat/heavy_run"
HEAVY_RUN = {HEAVY_RUN_TAG: "true"}

# The longest a heavy run may take per profile (`dagster/max_runtime`): run monitoring fails a run still
# running after that, e.g. one whose run worker died with the code server that launched it, which nothing
# else would notice. Bounds: several times the longest measured run, so a loaded machine never hits them.
# embedded: the yolov10s FP start took 13 min on this 2-core machine (README, ladder L8; QAT partitions
# less), so 2 h. coco: 100 FP epochs of 118k images at 640 px, then 100 QAT epochs that the second method
# of a seed waits for, on one GPU: not measured here, so a day for each, 48 h. smoke: seconds, so 30 min.
MAX_RUN_SECONDS = {"smoke": 30 * 60, "embedded": 2 * 3600, "coco": 48 * 3600}
# A run that failed without a step failing (its worker died or hung) is re-executed once by Dagster's run
# retries (run_retries in dagster.yaml); a step that failed is not: the yolo10m sensor and seed_backfill
# decide about those (README, "Runs that die").
RUN_RETRY_TAGS = {"dagster/max_retries": "1", "dagster/retry_on_asset_or_op_failure": "false"}


def monitored_run_tags(profile: str) -> dict[str, str]:
    """The tags of a job that runs heavy steps: the profile's max runtime, and run retries."""
    if profile not in MAX_RUN_SECONDS:
        raise ValueError(f"no max run time for profile {profile!r}: add it to MAX_RUN_SECONDS in {__name__}")
    return {"dagster/max_runtime": str(MAX_RUN_SECONDS[profile]), **RUN_RETRY_TAGS}

PARTITIONED_STAGES = ("qat_checkpoint", "qc_checkpoint", "stability_verdict", "onnx_model")


def stage_selection(variants: tuple[str, ...], stages: tuple[str, ...]) -> AssetSelection:
    return AssetSelection.assets(*[[variant, stage] for variant in variants for stage in stages])


def build_jobs(profile: str) -> dict:
    monitored = monitored_run_tags(profile)
    heavy = {**HEAVY_RUN, **monitored}
    return {
        "foundation_job": define_asset_job(
            "foundation_job",
            selection=AssetSelection.assets("coco_subset", "calibration_subset")
            | stage_selection(VALIDATION_VARIANTS, ("pretrained_checkpoint",)),
            description="Dataset, calibration set and the yolo10n/yolo10s FP starting points.",
            executor_def=multiprocess_executor, tags=monitored,
        ),
        "validation_partition_job": define_asset_job(
            "validation_partition_job",
            selection=stage_selection(VALIDATION_VARIANTS, PARTITIONED_STAGES),
            description="QAT, QC, the verdict and the ONNX export of one method|seed partition, for yolo10n and yolo10s.",
            executor_def=in_process_executor, tags=heavy,
        ),
        "decision_job": define_asset_job(
            "decision_job",
            selection=AssetSelection.assets("comparison", "gate"),
            description="Comparison, plots, summary.md and the gate.",
            executor_def=in_process_executor,
        ),
        # One variant's FP start and one variant's partitions: qat-ladder runs each variant's partitions as
        # soon as its own FP start is there, and the sensor runs yolo10m's after the gate.
        **{
            job.name: job
            for variant in VARIANTS
            for job in (
                define_asset_job(
                    f"{variant}_pretrained_job", selection=stage_selection((variant,), ("pretrained_checkpoint",)),
                    description=f"The {variant} FP starting point.", executor_def=in_process_executor, tags=heavy,
                ),
                define_asset_job(
                    f"{variant}_partition_job", selection=stage_selection((variant,), PARTITIONED_STAGES),
                    description=f"QAT, QC, the verdict and the ONNX export of one {variant} method|seed partition.",
                    executor_def=in_process_executor, tags=heavy,
                ),
            )
        },
        "dataset_job": define_asset_job(
            "dataset_job", selection=AssetSelection.assets("coco_subset", "calibration_subset"),
            description="The dataset and the calibration set.", executor_def=in_process_executor,
        ),
    }
