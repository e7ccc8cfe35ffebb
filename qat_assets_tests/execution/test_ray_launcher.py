"""Heavy steps as Ray jobs through dagster-ray, against a real local Ray head started here (CPU only,
two logical GPUs), compared with the local launcher on the same data; and the Ray Pipes client's faults:
a dashboard outage mid-job, a message split across log chunks, a last log line without its newline."""

import json
import re
import shlex
import threading
import time

import pytest
import torch
from dagster import AssetExecutionContext, MaterializeResult, asset, materialize
from dagster_pipes import PIPES_PROTOCOL_VERSION, PIPES_PROTOCOL_VERSION_FIELD

from qat_assets.core import layout
from qat_assets.core.settings import load_settings
from qat_assets.execution.launcher import HeavyStepLauncher
from qat_assets.execution.pipes_clients import RayJobPipesClient, pipes_client_for
from qat_assets.execution.ray_jobs import QAT_ASSETS_DIR, is_pipes_message
from qat_assets_tests.dagster_harness import latest_metadata, run_assets, step_failure_messages
from qat_assets_tests.execution.tcp_proxy import outage_proxy
from qat_assets_tests.servers import local_ray_head

QAT_AND_QC = ["yolo10n/qat_checkpoint", "yolo10n/qc_checkpoint"]


@pytest.fixture(scope="module")
def ray_address():
    with local_ray_head(num_gpus=2) as address:
        yield address


def use_ray(monkeypatch, address: str, **settings: str) -> dict:
    """Point the settings at the Ray head, and return resources whose launcher submits Ray jobs there."""
    monkeypatch.setenv("QAT_LAUNCHER", "ray")
    monkeypatch.setenv("QAT_RAY_ADDRESS", address)
    for name, value in settings.items():
        monkeypatch.setenv(f"QAT_{name.upper()}", value)
    return {"launcher": HeavyStepLauncher(pipes_client=pipes_client_for(load_settings()))}


def run_messages(instance, run_id) -> list[str]:
    return [record.event_log_entry.user_message for record in instance.get_records_for_run(run_id).records]


def test_a_smoke_partition_on_ray_gives_the_local_metadata_and_holds_one_gpu(storage, instance, ray_address, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    assert run_assets(instance, ["coco_subset", "calibration_subset", "yolo10n/pretrained_checkpoint"]).success
    local_run = run_assets(instance, QAT_AND_QC, "ema|0")
    assert local_run.success, step_failure_messages(local_run)

    # Logical GPUs: the CPU box trains on CPU, but each job must still reserve and be given one GPU.
    resources = use_ray(monkeypatch, ray_address, ray_gpus_per_step="1", device="cpu")
    ray_run = run_assets(instance, QAT_AND_QC, "ema|1", resources=resources)
    assert ray_run.success, step_failure_messages(ray_run)

    for asset in QAT_AND_QC:
        local, on_ray = latest_metadata(instance, asset, "ema|0"), latest_metadata(instance, asset, "ema|1")
        assert set(on_ray) == set(local)
        assert local["execution"]["launcher"] == "local" and on_ray["execution"]["launcher"] == "ray"
        assert on_ray["execution"]["gpus"] == 1.0 and on_ray["settings"]["launcher"] == "ray"
        assert on_ray["execution"]["cpus"] == 0  # a GPU job: the GPU is what Ray reserves
        # The job ran the qat_assets it carried (runtime_env py_modules), not the node's (this checkout).
        assert local["execution"]["code_dir"] == str(QAT_ASSETS_DIR)
        assert "runtime_resources" in on_ray["execution"]["code_dir"], on_ray["execution"]["code_dir"]
        state = torch.load(on_ray["checkpoint"], weights_only=True)
        assert "model" in state
    qat = latest_metadata(instance, "yolo10n/qat_checkpoint", "ema|1")
    assert qat["status"] == "2/2 epochs" and [row.data["epoch"] for row in qat["history"].records] == [0, 1, 2]

    # Progress reached the run log as for local steps, and each worker saw exactly one GPU.
    messages = run_messages(instance, ray_run.run_id)
    assert any("yolo10n ema|1 epoch 2: mAP50-95" in m for m in messages)
    placements = [re.search(r"CUDA_VISIBLE_DEVICES=(\S*)$", m) for m in messages if "worker on" in m]
    assert len(placements) == 2 and all(p and re.fullmatch(r"[01]", p.group(1)) for p in placements)

    # The Ray job list shows both jobs, and their logs are kept beside the outputs without Pipes lines.
    jobs = {job.submission_id: job for job in JobSubmissionClient(ray_address).list_jobs()}
    job_id = qat["execution"]["ray_job_id"]
    assert str(jobs[job_id].status) == "SUCCEEDED"
    log_file = layout.run_dir(storage, "yolo10n", "qat_checkpoint", "ema", 1) / "qat_worker.log"
    lines = log_file.read_text().splitlines()
    assert any("epoch 2: mAP50-95" in line for line in lines) and not any(map(is_pipes_message, lines))


def stop_ray_job_when_it_logs(address: str, text: str, timeout: float = 600.0) -> threading.Thread:
    """Stop the running Ray job whose log gets `text` (as losing its node would)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            for job in client.list_jobs():
                if job.status == JobStatus.RUNNING and text in client.get_job_logs(job.submission_id):
                    client.stop_job(job.submission_id)
                    return
            time.sleep(0.5)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_stopped_ray_job_fails_its_step_with_the_log_tail_and_the_rerun_resumes(
    storage, instance, ray_address, monkeypatch
):
    monkeypatch.setenv("QAT_QAT_EPOCHS", "5")  # room to stop the job between epoch 1 and the end
    assert run_assets(instance, ["coco_subset", "yolo10n/pretrained_checkpoint"]).success
    resources = use_ray(monkeypatch, ray_address, device="cpu")

    watcher = stop_ray_job_when_it_logs(ray_address, "baseline|0 epoch 1: mAP50-95")
    result = run_assets(instance, ["yolo10n/qat_checkpoint"], "baseline|0", resources=resources)
    watcher.join(timeout=5)
    assert not result.success
    (message,) = step_failure_messages(result)
    assert "Ray job" in message and "STOPPED" in message
    assert "baseline|0 epoch 1: mAP50-95" in message  # the tail of the job's log

    rerun = run_assets(instance, ["yolo10n/qat_checkpoint"], "baseline|0", resources=resources)
    assert rerun.success, step_failure_messages(rerun)
    qat = latest_metadata(instance, "yolo10n/qat_checkpoint", "baseline|0")
    assert re.fullmatch(r"resumed after epoch [1-4] of 5", qat["resume"]), qat["resume"]
    assert qat["status"] == "5/5 epochs"
    # A CPU-only job reserves one Ray CPU per torch thread it runs.
    assert qat["execution"]["cpus"] == qat["execution"]["cpu_threads"] >= 1


def pipes_message_line(payload: dict) -> str:
    return json.dumps({PIPES_PROTOCOL_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": "report_custom_message",
                       "params": {"payload": payload}})


def run_ray_job(client: RayJobPipesClient, script: str) -> tuple[bool, list, str]:
    """Run `python -c script` as a Ray job through `client` in a real Dagster step: (success, the custom
    messages it read, the step's failure message); the job's submission id is the step's run id."""
    outcome = {}

    @asset
    def ray_probe(context: AssetExecutionContext) -> MaterializeResult:
        params = {"entrypoint": shlex.join(["python", "-c", script]), "submission_id": context.run.run_id}
        outcome["messages"] = client.run(context=context, submit_job_params=params).get_custom_messages()
        return MaterializeResult()

    result = materialize([ray_probe], raise_on_error=False)
    failures = [event.step_failure_data.error.to_string() for event in result.all_events if event.is_step_failure]
    return result.success, outcome.get("messages", []), "".join(failures)


def test_a_pipes_message_split_across_chunks_and_a_last_line_without_newline_are_both_read(ray_address):
    # A ~40 KB message written in two parts 2 s apart reaches the log stream as two chunks (dagster-ray 0.4.8
    # parses each part alone and drops both); the last message has no newline, so the stream never hands it over.
    big, last = pipes_message_line({"n": 1, "pad": "x" * 40_000}), pipes_message_line({"n": 2})
    script = (
        "import sys, time\n"
        f"big, last = {big!r}, {last!r}\n"
        "sys.stdout.write('plain output\\n' + big[:1000]); sys.stdout.flush(); time.sleep(2)\n"
        "sys.stdout.write(big[1000:] + '\\n' + last); sys.stdout.flush()\n"
    )
    success, messages, failure = run_ray_job(RayJobPipesClient(ray_address, poll_interval=0.2), script)
    assert success, failure
    assert list(messages) == [{"n": 1, "pad": "x" * 40_000}, {"n": 2}]


def test_a_dashboard_outage_mid_job_fails_the_step_and_leaves_no_running_ray_job(ray_address):
    from ray.job_submission import JobStatus, JobSubmissionClient

    direct = JobSubmissionClient(ray_address)
    with outage_proxy(ray_address) as proxy:
        client = RayJobPipesClient(f"http://127.0.0.1:{proxy.port}", poll_interval=0.2, status_patience_s=3.0,
                                   stop_patience_s=60.0)

        def outage():  # once the job runs: the dashboard's port closes for 8 s, longer than the status patience
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                running = [job for job in direct.list_jobs() if job.status == JobStatus.RUNNING
                           and "ray_probe" in (job.entrypoint or "") and job.submission_id not in seen]
                if running:
                    job_ids.append(running[0].submission_id)
                    proxy.take_down()
                    time.sleep(8)
                    proxy.bring_back()
                    return
                time.sleep(0.2)

        seen = {job.submission_id for job in direct.list_jobs()}
        job_ids: list[str] = []
        thread = threading.Thread(target=outage, daemon=True)
        thread.start()
        started = time.monotonic()
        success, _, failure = run_ray_job(client, "import time; print('ray_probe', flush=True); time.sleep(600)")
        thread.join(timeout=5)
        assert proxy.refused > 0  # the client did meet the closed port
    assert not success and "ConnectionError" in failure, failure
    (job_id,) = job_ids
    assert direct.get_job_status(job_id) == JobStatus.STOPPED
    assert time.monotonic() - started < 120  # it gave up after its patience, not after the job's 600 s
    assert not [job.submission_id for job in direct.list_jobs() if not job.status.is_terminal()]
