"""Servers under test as subprocesses: start, wait until SERVING, always stop; their RSS and CPU."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from mediatag_common.grpc_server import health_check_stub

logger = logging.getLogger(__name__)

# The directory that holds the ``bench`` package: the working directory of a server started
# as ``python -m bench.…``.
PACKAGE_PARENT = Path(__file__).resolve().parent.parent
_PROBE_TIMEOUT = 1.0
_PROBE_PAUSE = 0.05
_LOG_TAIL_BYTES = 4000


class ServerStartError(RuntimeError):
    """A server exited or did not answer SERVING in time; carries the end of its log."""


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as probes:
        # Held open together, so the kernel cannot hand out the same port twice.
        sockets = [
            probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in sockets]


@contextlib.asynccontextmanager
async def running_server(
    name: str,
    argv: Sequence[str],
    *,
    address: str,
    log_path: Path,
    ready_timeout: float,
    stop_timeout: float,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``argv`` until the block ends; enter once its health service says SERVING.

    Its output goes to ``log_path``. On the way out, however the block ends, it gets SIGTERM
    and, if still running after ``stop_timeout`` seconds, SIGKILL.
    """
    with log_path.open("ab") as log:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env
        )
    try:
        await _wait_until_serving(name, process, address, log_path, ready_timeout)
        yield process
    finally:
        await _stop(name, process, stop_timeout)


async def _wait_until_serving(
    name: str,
    process: asyncio.subprocess.Process,
    address: str,
    log_path: Path,
    ready_timeout: float,
) -> None:
    try:
        async with asyncio.timeout(ready_timeout):
            await _probe_until_serving(name, process, address, log_path)
    except TimeoutError:
        raise ServerStartError(
            f"{name} server not SERVING at {address} within {ready_timeout:.0f} s; "
            f"its log ends:\n{_tail(log_path)}"
        ) from None


async def _probe_until_serving(
    name: str, process: asyncio.subprocess.Process, address: str, log_path: Path
) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        check = health_check_stub(channel)
        while process.returncode is None:
            try:
                response = await check(
                    health_pb2.HealthCheckRequest(), timeout=_PROBE_TIMEOUT, wait_for_ready=True
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as error:
                logger.debug("%s not ready yet: %s", name, error.code())
            await asyncio.sleep(_PROBE_PAUSE)
    raise ServerStartError(
        f"{name} server exited with status {process.returncode} before it was ready; "
        f"its log ends:\n{_tail(log_path)}"
    )


async def _stop(name: str, process: asyncio.subprocess.Process, grace: float) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            logger.warning("%s server still running %.0f s after SIGTERM: killing it", name, grace)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    logger.debug("%s server exited with status %s", name, process.returncode)


def _tail(log_path: Path) -> str:
    with log_path.open("rb") as log:
        log.seek(max(0, log_path.stat().st_size - _LOG_TAIL_BYTES), os.SEEK_SET)
        return log.read().decode(errors="replace")


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` (Linux ``/proc/PID/status`` VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            kilobytes = line.split()[1]
            return int(kilobytes) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int, *, main_thread: bool = False) -> float:
    """User plus system CPU seconds process ``pid`` has used: all its threads, or only its
    main thread (where an asyncio server runs its event loop)."""
    path = Path(f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat")
    # The command name may hold spaces and parentheses; the fields follow the last ")".
    fields = path.read_text().rsplit(")", 1)[1].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / os.sysconf("SC_CLK_TCK")
