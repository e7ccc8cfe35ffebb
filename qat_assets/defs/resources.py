"""The `experiment` resource: settings resolved from QAT_PROFILE, the QAT_* environment and run config."""

from __future__ import annotations

from typing import Optional

from dagster import ConfigurableResource

from qat_assets.core.settings import Settings, load_settings


class ExperimentSettings(ConfigurableResource):
    """Overrides on top of QAT_PROFILE and the QAT_* environment (unset fields keep those values).

    The common knobs are fields; `overrides` takes any other setting by name, as text
    (`{"qc_lr": "0.001", "seeds": "0,1"}`), validated like the environment variables.
    """

    profile: Optional[str] = None
    storage: Optional[str] = None
    device: Optional[str] = None
    coco_root: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    pretrain_epochs: Optional[int] = None
    qat_epochs: Optional[int] = None
    overrides: dict[str, str] = {}

    def settings(self) -> Settings:
        fields = {k: v for k, v in self.model_dump().items() if v is not None and k != "overrides"}
        return load_settings({**self.overrides, **fields})
