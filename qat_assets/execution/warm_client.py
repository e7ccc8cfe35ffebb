"""Runs one heavy step in a fork of the warm worker server: `python -m qat_assets.execution.warm_client SOCKET STEP ...`.

The local launcher starts this in place of `python -m qat_assets.execution.worker STEP ...` when a warm
server (warm_server.py) serves its storage. It imports the standard library only (about 0.1 s instead of
the worker's 6-7 s of torch, Ultralytics and Brevitas), hands its argv, environment, working directory and
stdin/stdout/stderr to the server, which forks a child that runs the worker with them, and then stands in
for that child: SIGINT/SIGTERM/SIGHUP are passed on to it, and this process ends the way the child ended,
with its exit code or killed by the same signal, so the Pipes client sees what it would see of a cold
worker (a SIGKILLed worker is `code -9`). If no server answers, or the server says it cannot run this
request like a cold worker would (another interpreter, PYTHONPATH or import-time setting), the worker
runs cold in this process instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
COLD_WORKER = ("-m", "qat_assets.execution.worker")


def socket_path(storage: Path) -> Path:
    """Where the warm server of `storage` listens. In the temp folder: a Unix socket path holds at most
    107 bytes, which a storage path can exceed; the digest keeps one server per storage."""
    digest = hashlib.sha256(str(Path(storage).absolute()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"qat-warm-workers-{digest}.sock"


def read_message(stream) -> dict | None:
    line = stream.readline()
    return json.loads(line) if line else None


def ping(path: Path, timeout: float = 2.0) -> dict | None:
    """The server's description ({"pid": ..., ...}) if one answers at `path`, else None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(path))
            conn.sendall(json.dumps({"ping": True}).encode() + b"\n")
            return read_message(conn.makefile("rb"))
    except (OSError, ValueError):
        return None


def request_for(worker_argv: list[str]) -> dict:
    return {"argv": worker_argv, "env": dict(os.environ), "cwd": os.getcwd(), "executable": sys.executable}


def run_cold(worker_argv: list[str], reason: str) -> None:
    print(f"warm worker server: {reason}; running the worker cold", file=sys.stderr, flush=True)
    os.execv(sys.executable, [sys.executable, *COLD_WORKER, *worker_argv])


def exit_like(returncode: int) -> int:
    """Exit with `returncode` as Popen reports it: a negative one means the child was killed by that signal."""
    if returncode < 0:
        if -returncode not in (signal.SIGKILL, signal.SIGSTOP):  # these two cannot have a handler
            signal.signal(-returncode, signal.SIG_DFL)  # undo forward(), and Python's SIG_IGN of SIGPIPE
        os.kill(os.getpid(), -returncode)
    return returncode


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        raise SystemExit("usage: python -m qat_assets.execution.warm_client SOCKET STEP [worker options]")
    path, worker_argv = Path(argv[0]), argv[1:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        # The child writes where this process writes: its stdin/stdout/stderr travel with the request.
        socket.send_fds(conn, [json.dumps(request_for(worker_argv)).encode() + b"\n"], [0, 1, 2])
        replies = conn.makefile("rb")
        started = read_message(replies)
    except OSError as exc:
        run_cold(worker_argv, f"none answers at {path} ({exc})")
    if started is None or "refused" in started:
        run_cold(worker_argv, started["refused"] if started else f"the server at {path} closed the connection")
    child = started["pid"]

    def forward(signum, frame):
        try:
            os.kill(child, signum)
        except ProcessLookupError:  # it ended meanwhile; its status is on the way
            pass

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, forward)
    finished = read_message(replies)
    if finished is None:
        print(f"warm worker server: the server at {path} went away while worker pid {child} ran", file=sys.stderr)
        return 1
    return exit_like(finished["returncode"])


if __name__ == "__main__":
    sys.exit(main())
