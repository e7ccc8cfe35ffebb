"""Run-time overrides of the `experiment` resource: graph-shaping settings are refused."""

import pytest
from dagster import AssetKey

from qat_assets.definitions import defs
from qat_assets.defs.resources import ExperimentSettings


def run_gate_with_overrides(instance, overrides):
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[AssetKey("gate")], raise_on_error=False,
        run_config={"resources": {"experiment": {"config": {"overrides": overrides}}}},
    )


def failure_text(result) -> str:
    return "\n".join(str(e.event_specific_data) for e in result.all_events if e.is_failure)


@pytest.mark.parametrize(("setting", "variable"), [("seeds", "QAT_SEEDS"), ("backfill_cron", "QAT_BACKFILL_CRON")])
def test_a_graph_shaping_override_fails_the_run_naming_its_environment_variable(storage, instance, setting, variable):
    result = run_gate_with_overrides(instance, {setting: "0,1,2" if setting == "seeds" else "0 3 * * *"})
    assert not result.success
    assert f"`{setting}` cannot be overridden per run" in failure_text(result) and variable in failure_text(result)
    assert instance.get_latest_materialization_event(AssetKey("gate")) is None  # nothing ran


def test_other_overrides_still_apply(storage):
    assert ExperimentSettings(overrides={"qc_lr": "0.005"}).settings().qc_lr == 0.005
