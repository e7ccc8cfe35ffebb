import subprocess
import sys

from dagster import AssetKey, AssetSelection

from qat_assets.core.settings import VARIANTS
from qat_assets.definitions import defs

HEAVY = ("pretrained_checkpoint", "qat_checkpoint", "qc_checkpoint", "onnx_model")


def test_every_variant_has_its_group_of_assets_and_the_decision_assets_exist():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    for variant in VARIANTS:
        for stage in (*HEAVY, "stability_verdict"):
            assert f"{variant}/{stage}" in keys
            assert graph.get(AssetKey([variant, stage])).group_name == variant
    assert {"coco_subset", "calibration_subset", "comparison", "gate"} <= keys


def test_heavy_steps_carry_the_gpu_pool_and_light_steps_do_not():
    graph = defs.resolve_asset_graph()
    for variant in VARIANTS:
        for stage in HEAVY:
            assert graph.get(AssetKey([variant, stage])).pools == {"gpu"}
        assert not graph.get(AssetKey([variant, "stability_verdict"])).pools
    assert not graph.get(AssetKey("gate")).pools


def test_partition_keys_read_method_bar_seed_from_settings():
    partitions = defs.resolve_asset_graph().get(AssetKey(["yolo10n", "qat_checkpoint"])).partitions_def
    assert sorted(partitions.get_partition_keys()) == ["baseline|0", "baseline|1", "ema|0", "ema|1"]


def test_adding_a_seed_is_a_setting():
    code = (
        "from dagster import AssetKey; from qat_assets.definitions import defs;"
        "p = defs.resolve_asset_graph().get(AssetKey(['yolo10s', 'qc_checkpoint'])).partitions_def;"
        "print(sorted(p.get_partition_keys()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={**_env(), "QAT_SEEDS": "0,1,7"}, capture_output=True, text=True, check=True
    ).stdout
    assert "'ema|7'" in out and "'baseline|7'" in out


def test_loading_the_code_location_does_not_import_torch_or_onnx():
    code = "import sys, qat_assets.definitions; print(sorted(m for m in ('torch', 'ultralytics', 'brevitas', 'onnx', 'onnxruntime') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_launcher_setting_picks_the_pipes_client_when_the_code_location_loads():
    code = (
        "import sys; from qat_assets.definitions import defs;"
        "print(type(defs.resources['launcher'].pipes_client).__name__, 'ray' in sys.modules)"
    )
    clients = {
        launcher: subprocess.run(
            [sys.executable, "-c", code], env={**_env(), **env}, capture_output=True, text=True, check=True
        ).stdout.split()
        for launcher, env in (
            ("local", {}), ("ray", {"QAT_LAUNCHER": "ray", "QAT_RAY_ADDRESS": "http://head:8265"}),
        )
    }
    assert clients == {"local": ["PipesSubprocessClient", "False"], "ray": ["RayJobPipesClient", "False"]}


def _env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("QAT_SEEDS")}


def test_the_yolo10m_chain_is_downstream_of_the_gate_and_its_blocking_check():
    graph = defs.resolve_asset_graph()
    assert AssetKey("gate") in graph.get(AssetKey(["yolo10m", "pretrained_checkpoint"])).parent_keys
    assert AssetKey("gate") not in graph.get(AssetKey(["yolo10n", "pretrained_checkpoint"])).parent_keys
    downstream = AssetSelection.assets("gate").downstream().resolve(graph)
    assert {AssetKey(["yolo10m", stage]) for stage in (*HEAVY, "stability_verdict")} <= downstream
    (check,) = [spec for spec in defs.get_assets_def(AssetKey("gate")).check_specs if spec.name == "gate_passed"]
    assert check.blocking


def test_heavy_assets_carry_code_versions():
    graph = defs.resolve_asset_graph()
    for stage in HEAVY:
        assert graph.get(AssetKey(["yolo10s", stage])).code_version


def test_heavy_jobs_carry_the_profiles_max_runtime_and_retry_only_a_dead_run():
    from qat_assets.core.settings import PROFILES
    from qat_assets.defs.automation.jobs import MAX_RUN_SECONDS, build_jobs

    assert set(MAX_RUN_SECONDS) == set(PROFILES)
    heavy = ["foundation_job", "validation_partition_job"] + [f"{v}_{kind}_job" for v in VARIANTS for kind in ("pretrained", "partition")]
    for profile in PROFILES:
        jobs = build_jobs(profile)
        for name in heavy:
            tags = jobs[name].tags
            assert tags["dagster/max_runtime"] == str(MAX_RUN_SECONDS[profile])
            assert tags["dagster/max_retries"] == "1" and tags["dagster/retry_on_asset_or_op_failure"] == "false"
        assert "dagster/max_runtime" not in jobs["decision_job"].tags
    assert MAX_RUN_SECONDS["smoke"] < MAX_RUN_SECONDS["embedded"] < MAX_RUN_SECONDS["coco"]
    assert defs.resolve_job_def("yolo10m_partition_job").tags["dagster/max_runtime"] == str(MAX_RUN_SECONDS["smoke"])
