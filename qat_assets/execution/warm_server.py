"""The warm worker server: imports torch, Ultralytics and Brevitas once, then forks one child per heavy step.

`python -m qat_assets.execution.warm_server STORAGE` listens on `warm_client.socket_path(STORAGE)` (mode
0600: whoever connects runs code as this user). Each request from a `warm_client` becomes a fresh
`os.fork()` of this preloaded process that takes the client's stdin/stdout/stderr, environment, working
directory and argv and runs `worker.main`, exactly the code a cold `python -m qat_assets.execution.worker`
runs; the server reports the child's exit status (negative: killed by that signal) back to the client.
So a step pays a fork (milliseconds) instead of 6-7 s of imports, and results stay those of a cold worker:
the parent runs no torch op (no intra-op thread pool, no RNG draw, no CUDA context), so every child starts
from the same state a fresh interpreter would reach after the same imports. A client that disappears
(SIGKILLed step) takes its child with it, and a child dies with the server (PR_SET_PDEATHSIG), so no
orphan keeps training on a GPU.

Hand-rolled rather than `multiprocessing`'s forkserver (`set_forkserver_preload`): that server serves only
the process tree that started it (its address and auth key go to that tree's children), and its children
run a pickled `Process` target with the parent's stdio and environment. Here the clients are unrelated
processes (Dagster step processes launched by the daemon), and each child needs the client's stdio, env
and exit status as a subprocess would have them.

`running_warm_server(storage, log_file)` starts one for the length of a `with` block (qat-ladder, tests).
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qat_assets.execution.warm_client import ping, socket_path
from qat_assets.execution.worker import FORKED_FROM_ENV, WORKER_ENV

# Read when the heavy modules are imported (Ultralytics' verbosity and offline mode, the matplotlib
# backend, OpenMP/MKL thread counts at library load, the module search path): a child cannot change
# them, so a request whose values differ from the server's runs cold instead of with the server's.
IMPORT_TIME_ENV = (
    "PYTHONPATH", "YOLO_OFFLINE", "YOLO_VERBOSE", "YOLO_CONFIG_DIR", "MPLBACKEND", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "PYTORCH_NVML_BASED_CUDA_CHECK",
)
PR_SET_PDEATHSIG = 1
STARTUP_TIMEOUT_S = 300.0


def preload() -> None:
    """Import everything a step imports, without running a torch op."""
    import dagster_pipes  # noqa: F401

    from qat_assets.execution import worker

    for step in ("pretrain", "qat", "qc", "export"):
        worker.step_runner(step)
    import torch

    if torch.cuda.is_initialized():
        raise RuntimeError("importing the heavy modules initialised CUDA; forked workers could not use the GPU")


class ImportedEnvironment:
    """The environment the heavy modules were imported under, and what importing them changed in it
    (Ultralytics sets OMP_NUM_THREADS, NUMEXPR_MAX_THREADS and log levels; cv2 extends LD_LIBRARY_PATH)."""

    def __init__(self, before: dict[str, str], after: dict[str, str]):
        self.changes = {name: value for name, value in after.items() if before.get(name) != value}
        self.read = {name: before.get(name) for name in (*IMPORT_TIME_ENV, *self.changes)}

    def refusal(self, request: dict) -> str | None:
        """Why a child of this server would not run `request` like a cold worker would (None: it would)."""
        if request["executable"] != sys.executable:
            return f"the request runs {request['executable']}, the server {sys.executable}"
        for name, value in self.read.items():
            if request["env"].get(name) != value:
                return f"{name} is {request['env'].get(name)!r} in the request but was {value!r} when the server imported"
        return None

    def of_child(self, request_env: dict[str, str]) -> dict[str, str]:
        """The environment a cold worker has after its imports: the request's, changed as the imports change it."""
        return {**request_env, **self.changes}


def run_child(request: dict, env: dict[str, str], fds: list[int]) -> None:
    """In the forked child: become the cold worker process the client would have started, run it, exit."""
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(env)
    if env.get("PYTHONUNBUFFERED"):  # read at interpreter start, so applied here: a killed worker's log keeps all
        # As `python -u` does: text written straight to the file descriptor, no binary buffer below it
        # (reconfigure(write_through=True) would still leave the server's BufferedWriter in between).
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding=sys.stdout.encoding,
                                      errors=sys.stdout.errors, write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding=sys.stderr.encoding,
                                      errors="backslashreplace", write_through=True)
    sys.argv = ["qat_assets.execution.worker", *request["argv"]]
    code = 1
    try:
        from qat_assets.execution.worker import main

        code = main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        # A cold interpreter whose main raised KeyboardInterrupt prints the traceback and ends killed by
        # SIGINT (exit status -2, what a terminated step sees): so does the child.
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what an interpreter does on exit (logging.shutdown among others)
        sys.stdout.flush()
        sys.stderr.flush()
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


REQUEST_FIELDS = {"argv": list, "env": dict, "cwd": str, "executable": str}


def parse_request(data: bytes) -> dict:
    """A ping or a worker request (warm_client.request_for); ValueError naming what is wrong with anything else."""
    request = json.loads(data)
    if not isinstance(request, dict):
        raise ValueError(f"a request is a JSON object, not {type(request).__name__}")
    if request.get("ping"):
        return request
    for name, kind in REQUEST_FIELDS.items():
        if not isinstance(request.get(name), kind):
            raise ValueError(f"the request's {name!r} must be a JSON {kind.__name__}, got {request.get(name)!r}")
    return request


def claim_socket(path: Path) -> int:
    """Lock `path`'s lock file for the life of this server; the open descriptor. Whoever holds the lock owns
    the socket path: a second server for the same storage exits here instead of unlinking the first one's
    socket (and the first one, on stopping, never removes a socket another server bound)."""
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"another warm worker server owns {path} (its lock {path.with_suffix('.lock')} is held); "
                         "this one exits") from None
    return fd


class WarmServer:
    def __init__(self, path: Path, imported: ImportedEnvironment, lock_fd: int):
        """`lock_fd`: this server's claim on `path` (claim_socket)."""
        self.path = path
        self.imported = imported
        self.lock_fd = lock_fd
        self.children: dict[int, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.wakeup_r, self.wakeup_w = os.pipe()

    def serve(self) -> None:
        for fd in (self.wakeup_r, self.wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the selector through the pipe
        self.path.unlink(missing_ok=True)
        old_umask = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self.listener.listen(64)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)
        print(f"warm worker server pid {os.getpid()} listening on {self.path}", flush=True)
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.fileobj is self.listener:
                        self.accept()
                    elif key.fileobj == self.wakeup_r:
                        self.reap()
                    else:
                        self.client_left(key.fileobj)
        finally:
            self.close()

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)
        fds: list[int] = []
        try:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
            while not data.endswith(b"\n") and data:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            request = parse_request(data)
        except (OSError, ValueError) as exc:
            # Answered and dropped, with the descriptors it carried: the server goes on serving.
            print(f"a request could not be read: {exc}", flush=True)
            self.reply(conn, {"error": f"malformed request: {exc}"})
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        if request.get("ping"):
            self.reply(conn, {"pid": os.getpid(), "executable": sys.executable, "children": len(self.children)})
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        reason = self.imported.refusal(request) if len(fds) == 3 else "the request carried no stdin/stdout/stderr"
        if reason:
            self.reply(conn, {"refused": reason})
            conn.close()
            for fd in fds:
                os.close(fd)
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            # Never return into the server loop: its cleanup would signal the other children and unlink the
            # live server's socket.
            try:
                self.close_in_child(conn)
                run_child(request, {**self.imported.of_child(request["env"]), FORKED_FROM_ENV: str(self.path)}, fds)
            finally:
                os._exit(1)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.reply(conn, {"pid": pid})
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ)
        print(f"pid {pid}: {' '.join(request['argv'])}", flush=True)

    @staticmethod
    def reply(conn: socket.socket, message: dict) -> None:
        try:
            conn.sendall(json.dumps(message).encode() + b"\n")
        except OSError:  # the client left; client_left or reap cleans up
            pass

    def client_left(self, conn: socket.socket) -> None:
        """A client connection became readable: it sends nothing after its request, so it closed."""
        self.selector.unregister(conn)
        pid = next((p for p, c in self.children.items() if c is conn), None)
        if pid is not None:
            print(f"pid {pid}: its client went away; killing it", flush=True)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reap(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            print(f"pid {pid}: exit status {code}", flush=True)
            try:
                self.selector.unregister(conn)
            except KeyError:  # client_left unregistered it already
                pass
            conn.setblocking(True)
            self.reply(conn, {"returncode": code})
            conn.close()

    def close_in_child(self, conn: socket.socket) -> None:
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for fd in (self.wakeup_r, self.wakeup_w):
            os.close(fd)
        self.listener.close()
        os.close(self.lock_fd)  # the claim stays the server's: a child outliving it must not keep the lock
        for other in self.children.values():
            other.close()
        self.children.clear()
        conn.close()

    def close(self) -> None:
        """Stop: the children go too (a step whose worker vanished fails like a killed one)."""
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.listener.close()
        self.path.unlink(missing_ok=True)


@contextmanager
def running_warm_server(storage: Path, log_file: Path, wait: bool = True) -> Iterator[Path]:
    """A warm server for `storage` while the block runs; its socket path. One already serving is reused.

    `wait=False` does not wait for its imports: steps launched before it answers run cold (qat-ladder's
    first heavy step comes after the dataset steps anyway).
    """
    path = socket_path(storage)
    if ping(path) is not None:
        yield path
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        # A session of its own: a Ctrl-C in the terminal reaches the server only through its owner's cleanup.
        server = subprocess.Popen(
            [sys.executable, "-m", "qat_assets.execution.warm_server", str(storage)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while wait and ping(path) is None:
            if server.poll() is not None:
                raise RuntimeError(f"the warm worker server exited ({server.returncode}); see {log_file}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm worker server did not answer within {STARTUP_TIMEOUT_S:.0f}s; see {log_file}")
            time.sleep(0.2)
        yield path
    finally:
        if server.poll() is not None:
            print(f"the warm worker server exited early ({server.returncode}): heavy steps after that ran cold; "
                  f"see {log_file}", file=sys.stderr)
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # never leave a server (and its children) behind
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1:
        raise SystemExit("usage: python -m qat_assets.execution.warm_server [STORAGE (default: QAT_STORAGE or "
                         "$DAGSTER_HOME/artifacts)]")
    if argv:
        storage = Path(argv[0])
    else:
        from qat_assets.core.settings import load_settings

        storage = load_settings().artifact_root()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    path = socket_path(storage)
    lock_fd = claim_socket(path)  # before the imports: a second server for this storage exits at once
    os.environ.update(WORKER_ENV)  # what the launcher gives its workers, so their requests match
    before = dict(os.environ)
    preload()
    WarmServer(path, ImportedEnvironment(before, dict(os.environ)), lock_fd).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
