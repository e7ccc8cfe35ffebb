"""The code location: every asset, check, resource, job, sensor and schedule, assembled once.

Settings are resolved at load time only for what shapes the graph (the seeds of the partitions and the
backfill cron) and for the deployment's launcher (QAT_LAUNCHER: local subprocesses or a Ray cluster);
everything else is resolved when a step runs. Loading imports no torch and no ray.
"""

from dagster import Definitions

from qat_assets.defs.dataset import calibration_subset, coco_subset
from qat_assets.defs.decision.assets import comparison, gate
from qat_assets.defs.variant.assets import variant_assets
from qat_assets.core.settings import load_settings
from qat_assets.defs.automation.jobs import build_jobs
from qat_assets.defs.resources import ExperimentSettings
from qat_assets.execution.launcher import HeavyStepLauncher
from qat_assets.execution.pipes_clients import pipes_client_for
from qat_assets.defs.automation.schedules import build_seed_backfill_schedule
from qat_assets.defs.automation.sensors import build_yolo10m_sensor

graph_settings = load_settings()
jobs = build_jobs(graph_settings.profile)

defs = Definitions(
    assets=[
        coco_subset,
        calibration_subset,
        *variant_assets("yolo10n", graph_settings.seeds, gated=False),
        *variant_assets("yolo10s", graph_settings.seeds, gated=False),
        *variant_assets("yolo10m", graph_settings.seeds, gated=True),
        comparison,
        gate,
    ],
    jobs=list(jobs.values()),
    sensors=[
        build_yolo10m_sensor(graph_settings.seeds, jobs["yolo10m_pretrained_job"], jobs["yolo10m_partition_job"])
    ],
    schedules=[
        build_seed_backfill_schedule(graph_settings.seeds, jobs["validation_partition_job"], graph_settings.backfill_cron)
    ],
    resources={
        "experiment": ExperimentSettings(),
        "launcher": HeavyStepLauncher(pipes_client=pipes_client_for(graph_settings)),
    },
)
