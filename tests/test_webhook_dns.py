"""Webhook endpoints whose names never resolve (their DNS server does not answer) neither slow
uploads nor hold up another endpoint's deliveries.

A lookup the DNS server never answers blocks ``getaddrinfo`` for the resolver's whole
timeout, and cannot be cancelled. Such a server is not ours to run here (nor is the system's
resolver configuration ours to change), so ``socket.getaddrinfo`` of this process stands in:
names under ``NEVER_ANSWERED`` block until the test ends; every other name is looked up for
real. The service's own code runs as it does in production, up to that call.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from tests.conftest import PATIENCE, Cluster, wait_until
from tests.media_samples import jpeg_bytes
from tests.test_webhooks import OWNER, Receiver, endpoints_file, verified, webhook_cluster

NEVER_ANSWERED = ".dns-never-answers.test"
# asyncio's default executor has ThreadPoolExecutor's default size: as many dead names as it
# has threads took every one of them.
DEAD_NAMES = min(32, (os.cpu_count() or 1) + 4)
# An upload while every dead name is being looked up may take this many times the slowest
# upload before (a generous bound: the machine is shared). Before the fix one waited for a
# lookup to end (here: the end of the test; with glibc's defaults 10 s).
SLOWDOWN = 20


class UnansweredDns:
    """``getaddrinfo`` as with a DNS server that never answers names under
    ``NEVER_ANSWERED``: it blocks until ``released`` (then fails as glibc's does when its
    timeout ends), counting the lookups of each name in flight."""

    def __init__(self, real: Callable[..., list[Any]]) -> None:
        self._real = real
        self.released = threading.Event()
        self._lock = threading.Lock()
        self.in_flight: Counter[str] = Counter()
        self.most_of_one_name = 0

    def getaddrinfo(self, host: bytes | str | None, *args: Any, **kwargs: Any) -> list[Any]:
        if not (isinstance(host, str) and host.endswith(NEVER_ANSWERED)):
            return self._real(host, *args, **kwargs)
        with self._lock:
            self.in_flight[host] += 1
            self.most_of_one_name = max(self.most_of_one_name, self.in_flight[host])
        try:
            self.released.wait(PATIENCE)
        finally:
            with self._lock:
                self.in_flight[host] -= 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    def names_hanging(self) -> int:
        with self._lock:
            return sum(1 for count in self.in_flight.values() if count > 0)


@pytest.fixture
def unanswered_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[UnansweredDns]:
    dns = UnansweredDns(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns.getaddrinfo)
    yield dns
    # Before the services stop: nothing waits on a thread stuck in a lookup.
    dns.released.set()


async def upload(cluster: Cluster, owner: str, seed: int, within: float) -> tuple[str, float]:
    """One image's upload (given ``within`` seconds): its media id and how long it took."""
    files = [ipb.MediaFile(filename=f"p{seed}.jpg", content=jpeg_bytes(seed=seed))]
    started = time.perf_counter()
    response = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(owner_id=owner, category="Hair", files=files), timeout=within
    )
    return response.media[0].id, time.perf_counter() - started


async def test_endpoints_whose_names_never_resolve_slow_neither_uploads_nor_others(
    make_cluster: Callable[..., Cluster], unanswered_dns: UnansweredDns, tmp_path: Path
) -> None:
    receiver = Receiver()
    await receiver.start()
    endpoints = {f"dead{n}": f"http://dead{n}{NEVER_ANSWERED}/h" for n in range(DEAD_NAMES)}
    # By name, not address: its lookup is made like the dead ones'.
    endpoints["quick"] = f"http://localhost:{receiver.port}/quick"
    # Only OWNER's changes are sent: the uploads of others measure without webhooks.
    file = endpoints_file(tmp_path / "hooks.toml", endpoints, extra=f'owners = ["{OWNER}"]')
    # Attempts give up long before the lookups end, and are tried again meanwhile.
    cluster = webhook_cluster(make_cluster, file, max_endpoints=len(endpoints), timeout=0.5)
    try:
        await cluster.start_analysis()
        await cluster.start_ingest()
        await upload(cluster, "elsewhere", 100, PATIENCE)  # warms up
        baseline = max([(await upload(cluster, "elsewhere", s, PATIENCE))[1] for s in range(5)])

        media_id, _ = await upload(cluster, OWNER, 0, PATIENCE)

        async def every_dead_name_hangs() -> bool:
            return unanswered_dns.names_hanging() == DEAD_NAMES

        await wait_until(every_dead_name_hangs)
        bound = SLOWDOWN * baseline
        during = []
        for seed in range(10, 15):
            try:
                during.append((await upload(cluster, "elsewhere", seed, bound))[1])
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                pytest.fail(
                    f"an upload took over {bound:.3f} s (before: at most {baseline:.3f} s) "
                    f"while {DEAD_NAMES} webhook names were being looked up"
                )
        print(f"upload: at most {baseline * 1000:.0f} ms before, {max(during) * 1000:.0f} ms")

        async def quick_got_it() -> bool:
            return any(
                verified("quick", r)["data"]["mediaId"] == media_id
                for r in receiver.received["quick"]
            )

        await wait_until(quick_got_it)
        # Every dead name's lookup still hangs, one at a time: they held up nothing.
        assert unanswered_dns.names_hanging() == DEAD_NAMES
        assert unanswered_dns.most_of_one_name == 1
    finally:
        await receiver.stop()
