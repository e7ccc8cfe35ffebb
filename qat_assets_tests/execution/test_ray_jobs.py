"""The launcher settings: local or ray, the cluster address, and the GPUs a Ray job asks for."""

from pathlib import Path

import pytest

from qat_assets.core.requests import QCRequest
from qat_assets.core.settings import SettingsError, load_settings
from qat_assets.execution.ray_jobs import QAT_ASSETS_DIR, RayStep

SMOKE = {"QAT_PROFILE": "smoke"}


def test_local_is_the_default_and_ray_needs_a_dashboard_address():
    assert load_settings(environ=SMOKE).launcher == "local"
    with pytest.raises(SettingsError, match="launcher 'ray' needs ray_address: set QAT_RAY_ADDRESS"):
        load_settings(environ={**SMOKE, "QAT_LAUNCHER": "ray"})
    with pytest.raises(SettingsError, match="QAT_RAY_ADDRESS.*not the Ray dashboard address"):
        load_settings(environ={**SMOKE, "QAT_LAUNCHER": "ray", "QAT_RAY_ADDRESS": "ray://head:10001"})
    with pytest.raises(SettingsError, match="QAT_LAUNCHER"):
        load_settings(environ={**SMOKE, "QAT_LAUNCHER": "slurm"})
    with pytest.raises(SettingsError, match="launcher is 'local'; set QAT_LAUNCHER=ray"):
        load_settings(environ={**SMOKE, "QAT_RAY_ADDRESS": "http://head:8265"})
    ray = load_settings(environ={**SMOKE, "QAT_LAUNCHER": "ray", "QAT_RAY_ADDRESS": "http://head:8265/"})
    assert ray.ray_address == "http://head:8265"


@pytest.mark.parametrize(
    ("environ", "gpus"),
    [({"QAT_DEVICE": "cuda"}, 1.0), ({"QAT_DEVICE": "cuda:3"}, 1.0), ({"QAT_DEVICE": "cpu"}, 0.0),
     ({"QAT_DEVICE": ""}, 0.0), ({"QAT_DEVICE": "cpu", "QAT_RAY_GPUS_PER_STEP": "0.5"}, 0.5)],
)
def test_a_ray_job_asks_for_one_gpu_on_cuda_and_none_on_cpu(environ, gpus):
    settings = load_settings(
        environ={**SMOKE, "QAT_LAUNCHER": "ray", "QAT_RAY_ADDRESS": "http://head:8265", "QAT_STORAGE": "/s", **environ}
    )
    assert settings.ray_gpus() == gpus
    request = QCRequest(
        variant="yolo10n", method="ema", seed=0, qat_checkpoint=Path("/s/q.pt"), qat_sha256="0",
        calibration_yaml=Path("/s/c.yaml"), calibration_fingerprint="0", dataset_yaml=Path("/s/d.yaml"),
        out_dir=Path("/s/out"), settings=settings,
    )
    params = RayStep("job", "qc", request, settings.ray_gpus(), {}).submit_job_params()
    assert params.get("entrypoint_num_gpus", 0) == gpus
    assert params["entrypoint"] == "python -m qat_assets.execution.worker qc"
    # The job carries this qat_assets, ahead of the job's working directory on sys.path.
    assert params["runtime_env"]["py_modules"] == [str(QAT_ASSETS_DIR)]
    assert params["runtime_env"]["env_vars"]["PYTHONSAFEPATH"] == "1"
    assert "entrypoint_num_cpus" not in params
    cpu_only = RayStep("job", "qc", request, 0.0, {}, num_cpus=3).submit_job_params()
    assert cpu_only["entrypoint_num_cpus"] == 3 and "entrypoint_num_gpus" not in cpu_only
