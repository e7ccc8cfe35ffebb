"""Heavy steps forked from the warm worker server: same results as a cold worker, same failures, and a cold
fallback when no server runs. Each test starts its own server and stops it before it ends."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from qat_assets.core.artifacts import load_checkpoint, sha256_file
from qat_assets.execution.heavy_step_slots import available_cores
from qat_assets.execution.launcher import worker_command
from qat_assets.execution.worker import WORKER_ENV
from qat_assets.execution.warm_client import ping, read_message
from qat_assets.execution.warm_server import running_warm_server
from qat_assets_tests.dagster_harness import latest_metadata, run_assets, step_failure_messages
from qat_assets_tests.defs.test_variant import failure_of_a_killed_qat_worker
from qat_assets_tests.execution.test_worker import pretrained, qat_request  # noqa: F401 (a fixture)


def worker_env() -> dict:
    return {**os.environ, **WORKER_ENV}


def without_clocks_and_paths(result: dict) -> dict:
    kept = {k: v for k, v in result.items() if k not in ("seconds", "checkpoint", "sha256")}
    kept["history"] = [{k: v for k, v in row.items() if k not in ("seconds", "validation_seconds")} for row in result["history"]]
    for row in kept["history"]:  # the collapse diagnostics time themselves too
        if row.get("diagnostics"):
            row["diagnostics"] = {**row["diagnostics"], "model": {
                k: v for k, v in row["diagnostics"]["model"].items() if k != "seconds"}}
    kept["trajectory"] = {k: v for k, v in result["trajectory"].items() if k not in ("dir", "waited_seconds")}
    return kept


def run_standalone(command: list[str], request: Path, out_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, "qat", "--request", str(request), "--log-file", str(out_dir / "qat_worker.log"),
         "--result", str(out_dir / "result.json")],
        env=worker_env(), capture_output=True, text=True, timeout=600,
    )


def test_a_qat_step_forked_from_the_warm_server_equals_a_cold_one_bit_for_bit(pretrained, tmp_path):
    root = pretrained[0]
    results = {}
    with running_warm_server(root, tmp_path / "server.log") as server:
        for how, command in (
            ("cold", [sys.executable, "-m", "qat_assets.execution.worker"]),
            ("warm", [sys.executable, "-m", "qat_assets.execution.warm_client", str(server)]),
        ):
            out_dir = tmp_path / how
            completed = run_standalone(command, qat_request(pretrained, out_dir), out_dir)
            assert completed.returncode == 0, completed.stderr
            results[how] = json.loads((out_dir / "result.json").read_text())
    assert "running the worker cold" not in completed.stderr  # the last one, the warm one, was not refused
    assert "exit status 0" in (tmp_path / "server.log").read_text()  # the server forked and reaped it
    # Equal weights and results, all but the clocks, the paths and the file digests (torch.save names the
    # archive after the atomic write's random temp file, so two cold runs' digests differ too).
    cold, warm = (load_checkpoint(Path(results[how]["checkpoint"])) for how in ("cold", "warm"))
    assert cold.keys() == warm.keys() == {"model", "ema"}
    for part in cold:
        assert all(torch.equal(cold[part][name], warm[part][name]) for name in cold[part])
    assert without_clocks_and_paths(results["warm"]) == without_clocks_and_paths(results["cold"])
    assert ping(server) is None and not server.exists()  # stopped with the block


def test_a_request_the_server_cannot_run_like_a_cold_worker_runs_cold(pretrained, tmp_path):
    root = pretrained[0]
    out_dir = tmp_path / "qat"
    request = qat_request(pretrained, out_dir)
    with running_warm_server(root, tmp_path / "server.log") as server:
        completed = subprocess.run(
            [sys.executable, "-m", "qat_assets.execution.warm_client", str(server), "qat", "--request", str(request),
             "--log-file", str(out_dir / "qat_worker.log"), "--result", str(out_dir / "result.json")],
            env={**worker_env(), "OMP_NUM_THREADS": "7"}, capture_output=True, text=True, timeout=600,
        )
    assert "OMP_NUM_THREADS is '7' in the request" in completed.stderr and "running the worker cold" in completed.stderr
    assert completed.returncode == 0 and json.loads((out_dir / "result.json").read_text())["sha256"]
    assert "pid " not in (tmp_path / "server.log").read_text().split("listening on")[1]  # nothing was forked


def test_a_partition_runs_through_the_warm_server_and_a_killed_warm_worker_fails_only_its_step(storage, instance, tmp_path):
    with running_warm_server(storage, tmp_path / "server.log") as server:
        assert run_assets(instance, ["coco_subset", "calibration_subset", "yolo10n/pretrained_checkpoint"]).success
        result = run_assets(instance, ["yolo10n/qat_checkpoint"], "ema|0")
        assert result.success, step_failure_messages(result)
        qat = latest_metadata(instance, "yolo10n/qat_checkpoint", "ema|0")
        assert qat["execution"]["warm_server"] == str(server)
        # The forked child ran on the threads the launcher gave it: the instance sets no pool limit, so all cores.
        assert qat["execution"]["cpu_threads"] == available_cores()
        assert qat["status"] == "2/2 epochs" and qat["sha256"] == sha256_file(Path(qat["checkpoint"]))
        messages = [r.event_log_entry.user_message for r in instance.get_records_for_run(result.run_id).records]
        assert any("qat: starting worker (asking the warm worker server at" in m for m in messages)
        assert any("yolo10n ema|0 epoch 1: mAP50-95" in m for m in messages)  # progress through pipes

        # The OOM killer takes a warm worker: its client ends the same way, so the step fails with code -9.
        message = failure_of_a_killed_qat_worker(storage, instance)
        assert "the qat worker died" in message and "code -9" in message and "fresh start" in message
        assert ping(server)["children"] == 0  # reaped; the server serves on
    server_log = (tmp_path / "server.log").read_text()
    assert f"exit status -{int(signal.SIGKILL)}" in server_log
    assert ping(server) is None


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled_fds(pid: int, quiet_seconds: float = 2.0, timeout: float = 60.0) -> int:
    """The server's descriptor count once it stops changing: right after start-up the server may still be
    opening files of its own (the full file's run saw one more than a moment before, with no request)."""
    deadline, count, since = time.monotonic() + timeout, open_fds(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet_seconds:
        time.sleep(0.2)
        if (now := open_fds(pid)) != count:
            count, since = now, time.monotonic()
    return count


def send_raw(path: Path, data: bytes, fds: list[int]) -> dict | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(path))
        socket.send_fds(conn, [data], fds)
        conn.shutdown(socket.SHUT_WR)
        return read_message(conn.makefile("rb"))


def test_a_malformed_request_gets_an_error_reply_and_the_server_serves_on_without_leaking_fds(tmp_path):
    with running_warm_server(tmp_path / "storage", tmp_path / "server.log") as server:
        pid = ping(server)["pid"]
        before = settled_fds(pid)
        stdio = [os.open(os.devnull, os.O_RDWR) for _ in range(3)]
        try:
            for data in (b"not json\n", b"[1, 2]\n", b'{"argv": "qat", "env": {}}\n', b"\xff\xfe\n"):
                reply = send_raw(server, data, stdio)
                assert reply is not None and reply["error"].startswith("malformed request"), (data, reply)
        finally:
            for fd in stdio:
                os.close(fd)
        assert ping(server)["children"] == 0  # it answers, and forked nothing
        assert settled_fds(pid) == before  # the descriptors each request carried were closed
    assert "the request's 'argv' must be a JSON list" in (tmp_path / "server.log").read_text()


def test_a_second_server_for_the_same_storage_exits_and_leaves_the_first_ones_socket_and_cuda_steps_run_cold(tmp_path):
    storage = tmp_path / "storage"
    with running_warm_server(storage, tmp_path / "server.log") as server:
        first = ping(server)["pid"]
        second = subprocess.run([sys.executable, "-m", "qat_assets.execution.warm_server", str(storage)],
                                env=worker_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode != 0 and "another warm worker server owns" in second.stderr
        assert server.exists() and ping(server)["pid"] == first
        # While it serves, CPU steps fork from it and CUDA steps start cold.
        log_file = tmp_path / "qat_worker.log"
        assert worker_command(storage, "qat", log_file, on_cuda=False)[1] == server
        command, used = worker_command(storage, "qat", log_file, on_cuda=True)
        assert used is None and command[1:3] == ["-m", "qat_assets.execution.worker"]
    assert not server.exists()


def test_a_warm_worker_interrupted_by_sigint_exits_like_a_cold_one(tmp_path):
    """Both block reading their request from a FIFO nobody writes (after setting up their log), get SIGINT,
    and end killed by it (-2), as the subprocess Pipes client of a terminated step sees it."""
    codes = {}
    with running_warm_server(tmp_path / "storage", tmp_path / "server.log") as server:
        for how, command in (
            ("cold", [sys.executable, "-m", "qat_assets.execution.worker"]),
            ("warm", [sys.executable, "-m", "qat_assets.execution.warm_client", str(server)]),
        ):
            request, log_file = tmp_path / f"{how}.fifo", tmp_path / f"{how}.log"
            os.mkfifo(request)
            worker = subprocess.Popen([*command, "qat", "--request", str(request), "--log-file", str(log_file)],
                                      env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            while not log_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # past redirect_output, into the blocking open of the request
            worker.send_signal(signal.SIGINT)
            codes[how] = worker.wait(timeout=60)
            assert "KeyboardInterrupt" in log_file.read_text()
    assert codes == {"cold": -signal.SIGINT, "warm": -signal.SIGINT}
    assert f"exit status -{int(signal.SIGINT)}" in (tmp_path / "server.log").read_text()
