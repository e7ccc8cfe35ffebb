"""The `experiment` resource: settings resolved from QAT_PROFILE, the QAT_* environment and run config."""

from __future__ import annotations

from typing import Optional

from dagster import ConfigurableResource
from pydantic import field_validator

from qat_assets.core.settings import Settings, load_settings

# Settings read when the code location loads, because they shape the graph: the seeds are the
# partitions, the cron is the schedule's. A run-time value would contradict the loaded graph
# (a run could count seeds that have no partition), so these are set in the environment only.
GRAPH_SHAPING = {"seeds": "QAT_SEEDS", "backfill_cron": "QAT_BACKFILL_CRON"}


class ExperimentSettings(ConfigurableResource):
    """Overrides on top of QAT_PROFILE and the QAT_* environment (unset fields keep those values).

    The common knobs are fields; `overrides` takes any other setting by name, as text
    (`{"qc_lr": "0.001"}`), validated like the environment variables. Settings that shape the graph
    (`seeds`, `backfill_cron`) are refused here: set QAT_SEEDS / QAT_BACKFILL_CRON and reload.
    """

    profile: Optional[str] = None
    storage: Optional[str] = None
    device: Optional[str] = None
    coco_root: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    pretrain_epochs: Optional[int] = None
    qat_epochs: Optional[int] = None
    overrides: dict[str, str] = {}

    @field_validator("overrides")
    @classmethod
    def _refuse_graph_shaping(cls, overrides: dict[str, str]) -> dict[str, str]:
        for name, variable in GRAPH_SHAPING.items():
            if name in overrides:
                raise ValueError(
                    f"`{name}` cannot be overridden per run: it shapes the graph (partitions/schedule) when the "
                    f"code location loads. Set {variable} in the environment and reload the code location instead."
                )
        return overrides

    def settings(self) -> Settings:
        fields = {k: v for k, v in self.model_dump().items() if v is not None and k != "overrides"}
        return load_settings({**self.overrides, **fields})
