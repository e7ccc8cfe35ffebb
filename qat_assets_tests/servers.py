"""Real servers for the cluster tests, started and stopped by the tests: a Ray head and a PostgreSQL.

Each is started in a session of its own and stopped through that session (or its pg_ctl) only, so a
test never touches a Ray or Postgres someone else runs on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(ready, what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} was not ready after {timeout:.0f}s")


def session_members(session_id: int) -> list[int]:
    """Processes of the session a server leads (Ray puts its workers in process groups of their own)."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id:  # field 6 of stat: the session id
            members.append(int(pid))
    return members


def stop_session(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server (it stops what it started), then SIGKILL whatever of its session is left."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in session_members(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def local_ray_head(num_gpus: int = 2) -> Iterator[str]:
    """A CPU-only Ray head with the job-submission server (dashboard); yields its http:// address.

    `num_gpus` logical GPUs let a test see Ray reserve and assign GPUs on a machine without any.
    Its jobs run `python -m qat_assets.execution.worker` with this venv's python and this checkout.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's unix sockets live under it
    dashboard_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
            "--num-cpus", "2", "--num-gpus", str(num_gpus), "--temp-dir", str(temp_dir), "--disable-usage-stats",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_until(lambda: process.poll() is None and http_ok(f"{address}/api/version"), "the Ray head")
        yield address
    finally:
        stop_session(process)
        shutil.rmtree(temp_dir, ignore_errors=True)


def as_unprivileged(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as `nobody` when we are root."""
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def local_postgres() -> Iterator[dict[str, str]]:
    """A throwaway PostgreSQL cluster on a free local port with a `dagster` database; yields its coordinates."""
    root = Path(tempfile.mkdtemp(prefix="pg"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "nobody")
    port = str(free_port())
    subprocess.run(
        as_unprivileged(["initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"]),
        check=True, capture_output=True,
    )
    # postgres forks its own children; pg_ctl stop is the clean way to end all of them.
    subprocess.run(
        as_unprivileged([
            "pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "start",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
        ]),
        check=True, capture_output=True,
    )
    try:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-c", "CREATE DATABASE dagster"],
            check=True, capture_output=True,
        )
        yield {"host": "127.0.0.1", "port": port, "user": "postgres", "password": "", "db": "dagster"}
    finally:
        subprocess.run(as_unprivileged(["pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
