"""Running ``mediatag`` as a subprocess, exactly as the README says, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from tests.conftest import PATIENCE

MEDIATAG = str(Path(sys.executable).parent / "mediatag")


def run_cli(*args: str, timeout: float = PATIENCE) -> subprocess.CompletedProcess[str]:
    """Run a client command of ``mediatag``; raises if it does not finish in time."""
    return subprocess.run(
        [MEDIATAG, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_json(*args: str, timeout: float = PATIENCE) -> Any:
    result = run_cli(*args, "--json", timeout=timeout)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_serving(
    port: int, within: float = PATIENCE, *, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until the standard health service at ``port`` answers SERVING; fail at once if
    ``process``, the one meant to serve there, exits first (a port taken meanwhile, say).

    Synchronous on purpose: it is called from async tests while their loop runs.
    """
    deadline = time.monotonic() + within
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while True:
            try:
                response = check(health_pb2.HealthCheckRequest(), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if process is not None and process.poll() is not None:
                raise AssertionError(
                    f"the service for port {port} exited ({process.returncode}) before serving"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"service on port {port} not SERVING within {within} s")
            time.sleep(0.05)


# Settings of every ``mediatag serve`` here unless the environment or a flag says otherwise.
# Metrics and the web gateway on free ports: never the fixed defaults. The local analyser in
# threads of the service's process: its default processes run at idle CPU priority and get
# only what other programs leave, so on a shared machine kept busy beside the suite a test's
# analysis could wait minutes (``test_e2e``'s kill-and-restart test took 188 s beside two
# busy loops, 14 s in threads). ``test_chaos`` and ``test_local_analyzer`` run the processes.
_TEST_DEFAULTS = {
    "MEDIATAG_INGEST_METRICS_PORT": "0",
    "MEDIATAG_ANALYSIS_METRICS_PORT": "0",
    "MEDIATAG_WEB_PORT": "0",
    "MEDIATAG_ANALYZER_PROCESSES": "0",
}


class Serve:
    """``mediatag serve [SERVICE] ARGS...`` in the background, its output in a log file."""

    def __init__(self, log: Path, *args: str, file_size_limit: int | None = None) -> None:
        self.log = log
        self.args = args
        # RLIMIT_FSIZE of the process: no file it writes may grow beyond this (a full disk
        # without root or a mount).
        self.file_size_limit = file_size_limit
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *wait_for_ports: int) -> Serve:
        command = [MEDIATAG, "serve", *self.args]
        if self.file_size_limit is not None:
            # util-linux's prlimit sets the limit and execs the service. Not a preexec_fn:
            # that runs in a fork of this process, whose gRPC threads then abort the child
            # now and then ("epoll_wait error: Bad file descriptor").
            command = ["prlimit", f"--fsize={self.file_size_limit}", *command]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**_TEST_DEFAULTS, **os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            for port in wait_for_ports:
                wait_serving(port, process=self.process)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.output()}") from None
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, as a crash would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=PATIENCE)

    def stop(self, timeout: float = PATIENCE) -> int:
        """SIGTERM and wait for the drain (its grace period, and on a loaded machine more);
        returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"mediatag serve did not stop within {timeout} s") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def stop_all(*services: Serve) -> None:
    """Stop ``services`` in their order, every one even when one of them will not stop."""
    with contextlib.ExitStack() as stopping:
        for service in reversed(services):  # the stack runs its callbacks last in, first out
            stopping.callback(service.stop)


# ---- memory of a process (Linux /proc) ----


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def rss_mib(pid: int) -> float:
    """The process's resident memory now (VmRSS), in MiB."""
    return _status_kib(pid, "VmRSS") / 1024


def peak_rss_mib(pid: int) -> float:
    """The process's highest resident memory since the last :func:`reset_peak_rss` (VmHWM)."""
    return _status_kib(pid, "VmHWM") / 1024


def reset_peak_rss(pid: int) -> None:
    """Start measuring the peak anew (``5`` to clear_refs resets VmHWM, Linux 4.0 and later)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
