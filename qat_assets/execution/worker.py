"""Runs one heavy step (pretrain, qat, qc, export) in its own process and reports back through dagster-pipes.

Launched by `HeavyStepLauncher` as `python -m qat_assets.execution.worker STEP [--log-file PATH]`; the request
comes in the pipes extras. Locally (`--log-file`), everything the libraries print (and a traceback or a
fatal-signal dump) goes to the log file, whose tail the launcher shows when the process dies. As a Ray
job (no `--log-file`), output stays on stdout/stderr: Ray keeps it as the job's log, and the Pipes
messages travel in that same stream, so redirecting it would drop them. Progress lines go to the
Dagster run log either way.
An expected failure (bad input, a broken checkpoint) is sent back as one `{"error": ...}` message, so the
step fails with that sentence rather than a stack trace.

Outside Dagster (debugging, tests), `--request FILE --result FILE` runs the same step from a JSON file.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

# The environment every worker runs in, cold, warm (warm_server.py) or on Ray.
# PYTORCH_NVML_BASED_CUDA_CHECK: torch.cuda.is_available() asks NVML instead of initialising CUDA, which
# would make the CUDA of the warm server's forked children unusable (warm_server.py); so cold workers do the same.
WORKER_ENV = {
    "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
}
# The torch threads a CPU worker may use, set by the launcher (its share of the cores, heavy_step_slots.py).
WORKER_THREADS_ENV = "QAT_WORKER_THREADS"
# Set by the warm server in the children it forks (its socket path): how a worker knows it ran warm. The
# launcher cannot know beforehand, since a server may refuse a request and the client then runs it cold.
FORKED_FROM_ENV = "WARM_WORKER_SERVER"
EXPECTED_ERRORS = ("DatasetError", "CheckpointError", "ArtifactError", "ValidationError", "TrainingDiverged")


def use_worker_threads() -> None:
    """Run torch on QAT_WORKER_THREADS intra-op threads, when set; before any torch op.

    Ultralytics' select_device() resets torch to its own count (cores - 1, at most 8) whenever a trainer or
    validator starts on the CPU, so its count is set to the same number.
    """
    value = os.environ.get(WORKER_THREADS_ENV)
    if value is None:
        return
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{WORKER_THREADS_ENV}={value!r} must be a whole number of threads, at least 1")
    import torch
    from ultralytics.utils import torch_utils

    torch.set_num_threads(int(value))
    torch_utils.NUM_THREADS = int(value)


def step_runner(step: str) -> tuple[type, Callable[[Any, Callable[[str], None]], dict]]:
    """Request model and function of a step (imported here: torch loads only inside the worker)."""
    if step == "pretrain":
        from qat_assets.core.pretrain import run_pretrain
        from qat_assets.core.requests import PretrainRequest

        return PretrainRequest, run_pretrain
    if step == "qat":
        from qat_assets.core.qat import run_qat
        from qat_assets.core.requests import QATRequest

        return QATRequest, run_qat
    if step == "qc":
        from qat_assets.core.qc_stage import run_qc_stage
        from qat_assets.core.requests import QCRequest

        return QCRequest, run_qc_stage
    if step == "export":
        from qat_assets.core.export_stage import run_export_stage
        from qat_assets.core.requests import ExportRequest

        return ExportRequest, run_export_stage
    raise SystemExit(f"unknown step {step!r}; expected pretrain, qat, qc or export")


def redirect_output(log_file: Path) -> Any:
    """Send this process's stdout/stderr (file descriptors, so native code too) to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_file, "a", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(handle.fileno(), 1)
    os.dup2(handle.fileno(), 2)
    faulthandler.enable(file=handle)
    return handle


OUTPUT_DIRS = ("out_dir", "trajectory_dir")  # request fields the step writes, so they need not exist yet


def unseen_inputs(request: Any) -> list[str]:
    """The request's input files and folders this machine cannot see (they live under QAT_STORAGE)."""
    paths = {name: value for name, value in request if isinstance(value, Path) and name not in OUTPUT_DIRS}
    paths["QAT_STORAGE"] = request.settings.artifact_root()
    return [f"{name}={path}" for name, path in paths.items() if not path.exists()]


def execute(step: str, payload: dict, log: Callable[[str], None]) -> dict:
    """Run the step; expected failures come back as {"error": message} instead of raising."""
    use_worker_threads()
    request_model, run = step_runner(step)
    try:
        request = request_model.model_validate(payload)
        missing = unseen_inputs(request)
        if missing:
            return {
                "error": f"the {step} worker on {socket.gethostname()} cannot see its inputs ({', '.join(missing)}); "
                "QAT_STORAGE must be a path every node mounts at the same place (NFS or the like)",
                "error_type": "InputsNotVisible",
            }
        return run(request, log)
    except Exception as exc:
        if type(exc).__name__ not in EXPECTED_ERRORS:
            raise
        traceback.print_exc()
        return {"error": str(exc), "error_type": type(exc).__name__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat_assets.execution.worker", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["pretrain", "qat", "qc", "export"])
    parser.add_argument("--log-file", type=Path, help="send all output here (default: keep stdout/stderr)")
    parser.add_argument("--request", type=Path, help="run outside Dagster: JSON request file")
    parser.add_argument("--result", type=Path, help="run outside Dagster: where to write the JSON result")
    args = parser.parse_args(argv)
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)

    if args.request is not None:
        if args.log_file is None:
            parser.error("--request needs --log-file")
        log_handle = redirect_output(args.log_file)

        def log(message: str) -> None:
            print(message, file=log_handle, flush=True)

        result = execute(args.step, json.loads(args.request.read_text()), log)
        from qat_assets.core.artifacts import write_json_atomic

        write_json_atomic(args.result or args.log_file.with_suffix(".result.json"), result)
        return 2 if "error" in result else 0

    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    messages_params = PipesEnvVarParamsLoader().load_messages_params()
    if args.log_file is not None and {"stdio", "buffered_stdio"} & set(messages_params):
        raise SystemExit("--log-file would redirect stdout/stderr, which carry this worker's Pipes messages; drop it")
    with open_dagster_pipes() as pipes:
        if args.log_file is not None:
            log_handle = redirect_output(args.log_file)
        else:
            log_handle = sys.stdout
            faulthandler.enable()

        def log(message: str) -> None:
            print(message, file=log_handle, flush=True)
            pipes.log.info(message)

        log(
            f"{args.step} worker on {socket.gethostname()} (pid {os.getpid()}), "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
        )
        result = execute(args.step, pipes.extras["request"], log)
        import torch  # loaded by the step already

        # What the step ran with, after Ultralytics had its say (use_worker_threads), and which qat_assets
        # it imported (on Ray: the copy the job carried, ray_jobs.py).
        origin = {"warm_server": os.environ.get(FORKED_FROM_ENV), "cpu_threads": torch.get_num_threads(),
                  "code_dir": str(Path(__file__).resolve().parents[1])}
        pipes.report_custom_message(json.loads(json.dumps({**result, "worker_origin": origin}, default=str)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
