import subprocess
import sys

from dagster import AssetKey

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


def _env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("QAT_SEEDS")}
