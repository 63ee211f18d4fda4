"""What the scale benchmark runs against: a PostgreSQL, analysis replicas on it, CPU counters.

The PostgreSQL is the one at ``--scale-database-url`` (a user that may create databases), or
a throwaway server started as the tests start theirs (``tests/postgres.py``). Each
measurement gets new, empty databases, so no run sees another's jobs or cached results.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psycopg
from mediatag.analysis.v1 import analysis_pb2_grpc

from bench.pipeline import running_analysis
from bench.processes import cpu_seconds, free_ports
from bench.sim_server import SimServer
from tests.postgres import PostgresServer, postgres_server


@dataclass
class Postgres:
    """The server, and new databases on it (each dropped at the end)."""

    server: PostgresServer
    made: list[str]

    def new_database(self) -> str:
        url = self.server.create_database()
        self.made.append(url)
        return url

    def postmaster_pid(self) -> int | None:
        """The server's main process when it runs on this machine (None elsewhere)."""
        # The backend serving this connection is a child of the main process: read its
        # parent while it lives.
        with psycopg.connect(self.made[-1] if self.made else self.server.admin_url) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            status = Path(f"/proc/{row[0] if row else 0}/status")
            if not status.exists():
                return None
            for line in status.read_text().splitlines():
                if line.startswith("PPid:"):
                    return int(line.split()[1])
        return None


@contextlib.contextmanager
def postgres(url: str | None) -> Iterator[Postgres]:
    with postgres_server(url) as server:
        made = Postgres(server, [])
        try:
            yield made
        finally:
            for database in made.made:
                server.drop_database(database)


def _stat_fields(pid: int | str) -> list[str]:
    # The command name may hold spaces and parentheses; the fields follow the last ")".
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_cpu_seconds(postmaster: int) -> float:
    """CPU seconds of a local PostgreSQL: its main process, the children it has reaped (the
    backends of closed connections) and those alive now."""
    ticks = sum(int(field) for field in _stat_fields(postmaster)[11:15])
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields(entry.name)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Replicas:
    """Analysis replicas (``bench.sim_server``) on one database, in order of ``ports``."""

    stubs: list[analysis_pb2_grpc.AnalysisServiceAsyncStub]
    pids: list[int]
    ports: list[int]


@contextlib.asynccontextmanager
async def running_replicas(
    work_dir: Path, template: SimServer, workers: Sequence[int]
) -> AsyncIterator[Replicas]:
    """One replica per entry of ``workers`` (its worker count), as ``template`` says
    otherwise; each with its own data directory, log and calls file."""
    ports = free_ports(len(workers))
    async with contextlib.AsyncExitStack() as stack:
        stubs, pids = [], []
        for number, (port, count) in enumerate(zip(ports, workers, strict=True)):
            sim = replace(
                template,
                port=port,
                workers=count,
                data_dir=work_dir / f"analysis{number}",
                calls_file=work_dir / f"calls{number}.json",
            )
            stub, process = await stack.enter_async_context(
                running_analysis(sim, work_dir / f"analysis{number}.log")
            )
            stubs.append(stub)
            pids.append(process.pid)
        yield Replicas(stubs, pids, ports)


class CpuMeter:
    """CPU seconds used by named processes between ``start`` and ``stop``."""

    def __init__(self, pids: Mapping[str, int], postmaster: int | None) -> None:
        self._pids = dict(pids)
        self._postmaster = postmaster
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {role: cpu_seconds(pid) for role, pid in self._pids.items()}
        if self._postmaster is not None:
            now["postgresql"] = server_cpu_seconds(self._postmaster)
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> dict[str, float]:
        after = self._now()
        self.used = {role: after[role] - self._before[role] for role in after}
        return self.used
