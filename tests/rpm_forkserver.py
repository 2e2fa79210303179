"""Run the `rpm` command in a fresh process forked from one that has already imported it.

Why: the suite makes about a thousand `rpm` calls on a 2-core machine, and each spent ~0.2 CPU-seconds on
starting Python, importing the CLI (pydantic-settings, cryptography) and tearing the modules down at exit, and
each pipeline run ~3 s more on importing Great Expectations. Here each call is still its own process running
the console script's code (``rpmctl.cli.main()``) with the test's arguments, environment, working folder and
standard streams (passed as file descriptors), and the exit status is that process's. What is shared: the
imports, made once by a single-threaded server before it forks (Airflow is not preloaded: it reads its
configuration at import, after the command has set AIRFLOW_HOME; nor DuckDB, see ``_serve``). What is skipped:
the interpreter's teardown of the modules at exit; the threads are joined and the atexit handlers run first.
The console script itself is still run by the tests that pipe it, start services from it, or install it
(test_packaging).

What the interpreter sets up once at its start from the environment — the standard streams' encoding and
error handler, the time zone, its own options (``PYTHON*``) — a forked child would inherit from the server, not
take from the test's environment: a call whose environment differs there runs the console script itself.

The server is started on first use, one per test process, and stopped when that process ends.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

_HEADER = struct.Struct("!I")
# What the interpreter reads from the environment at its start (and a forked child so keeps from the server).
_AT_START = ("PYTHON", "LC_", "LANG", "TZ")
_STATUS = struct.Struct("!ii")  # pid, then the wait status's return code


def _serve(path: str) -> None:
    """The server: preload, then fork one child per request (one request at a time)."""
    os.environ["GX_ANALYTICS_ENABLED"] = "false"  # as every command that validates sets it before GX loads
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401

    import rpmctl.cli  # noqa: F401

    # DuckDB is not preloaded: imported before the fork, a child that opened a database aborted at exit
    # ("terminate called without an active exception"). Its import is cheap (~0.06 s).
    assert "duckdb" not in sys.modules
    # The preloaded objects to the permanent generation: a child's garbage collections would otherwise visit
    # (and so copy, page by page) the whole inherited heap.
    gc.collect()
    gc.freeze()

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = listener.accept()
        msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        (size,) = _HEADER.unpack_from(msg)
        body = msg[_HEADER.size:]
        while len(body) < size:
            body += conn.recv(size - len(body))
        request = json.loads(body)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            _child(request, fds)  # never returns: the command's exit ends the process
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(_STATUS.pack(pid, 0))
            _, status = os.waitpid(pid, 0)
            conn.sendall(_STATUS.pack(pid, os.waitstatus_to_exitcode(status)))
        except OSError:
            pass  # the caller gave up (a timeout killed the command)
        finally:
            conn.close()


def _child(request: dict, fds: list[int]) -> None:
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [request["rpm"], *request["argv"]]
    from rpmctl.cli import main

    try:
        code = main()
    except SystemExit as exc:  # --help, argparse's usage errors
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # what the interpreter does with sys.exit("message")
        code = 1
    # What the interpreter's exit does, up to tearing down the modules: that part (~0.15 s of CPU with
    # thousands of inherited modules) is skipped; objects still open at this point are dropped as at a kill.
    threading._shutdown()  # type: ignore[attr-defined]  # waits for non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            pass
    os._exit(code or 0)


class ForkServer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._path = ""
        self._env: dict[str, str] = {}

    def _start(self) -> None:
        folder = tempfile.mkdtemp(prefix="rpm-forkserver-")
        self._path = str(Path(folder) / "sock")
        env = self._env = {k: v for k, v in os.environ.items() if not k.startswith(("RPM_", "AIRFLOW"))}
        self._proc = subprocess.Popen([sys.executable, "-m", "tests.rpm_forkserver", self._path], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).parent.parent)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # a signal, not a sleep: the server says when it listens
        if line != "ready\n":
            raise RuntimeError(f"the rpm fork server did not start (exit {self._proc.wait()})")
        atexit.register(self.stop)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def run(self, rpm: str, argv: list[str], env: dict[str, str], cwd: str | Path | None = None,
            input: str | None = None, stdout: int | None = subprocess.PIPE,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """Like ``subprocess.run([rpm, *argv], env=env, cwd=cwd, input=input, stdout=stdout,
        stderr=PIPE, text=True, timeout=timeout)``."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            if _at_start(env) != _at_start(self._env):
                return subprocess.run([rpm, *argv], env=env, cwd=cwd, input=input, stdout=stdout,
                                      stderr=subprocess.PIPE, text=True, timeout=timeout)
            return self._run(rpm, argv, env, cwd, input, stdout, timeout)

    def _run(self, rpm: str, argv: list[str], env: dict[str, str], cwd: str | Path | None, input: str | None,
             stdout: int | None, timeout: float) -> subprocess.CompletedProcess:
        in_r, in_w = os.pipe()
        err_r, err_w = os.pipe()
        out_r, out_w = os.pipe() if stdout == subprocess.PIPE else (None, stdout)
        assert out_w is not None
        body = json.dumps({"rpm": rpm, "argv": argv, "env": env, "cwd": str(cwd or os.getcwd())}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self._path)
            socket.send_fds(conn, [_HEADER.pack(len(body)) + body], [in_r, out_w, err_w])
            for fd in (in_r, err_w) if out_r is None else (in_r, out_w, err_w):
                os.close(fd)
            pid = _STATUS.unpack(_recv(conn, _STATUS.size))[0]
            streams: dict[str, bytes] = {}

            def drain(name: str, fd: int) -> None:
                with os.fdopen(fd, "rb") as f:
                    streams[name] = f.read()

            readers = [threading.Thread(target=drain, args=("err", err_r))]
            if out_r is not None:
                readers.append(threading.Thread(target=drain, args=("out", out_r)))
            for t in readers:
                t.start()
            try:
                if input:
                    os.write(in_w, input.encode())
            except BrokenPipeError:
                pass
            finally:
                os.close(in_w)
            conn.settimeout(timeout)
            try:
                code = _STATUS.unpack(_recv(conn, _STATUS.size))[1]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired([rpm, *argv], timeout) from None
            for t in readers:
                t.join(timeout)
        out = _text(streams["out"]) if out_r is not None else None
        return subprocess.CompletedProcess([rpm, *argv], code, out, _text(streams["err"]))


def _at_start(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_AT_START)}


def _text(data: bytes) -> str:
    """As ``subprocess.run(text=True)`` reads a pipe: decoded, universal newlines."""
    return data.decode().replace("\r\n", "\n").replace("\r", "\n")


def _recv(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise RuntimeError("the rpm fork server went away")
        data += chunk
    return data


SERVER = ForkServer()

if __name__ == "__main__":
    # `-m` put the repository's root first on the path; the console script sees only what is installed, so a
    # command here must not import anything more (a stray `import tests` or `bench` would fail for users).
    del sys.path[0]
    _serve(sys.argv[1])
