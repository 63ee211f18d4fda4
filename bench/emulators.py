"""Cloud Storage and S3 emulators on loopback, for the tests and the blob-store benchmark.

gcp-storage-emulator serves Cloud Storage's JSON API, moto's server the S3 API; both speak
to the vendors' own clients. Clients find them the ecosystems' way: ``STORAGE_EMULATOR_HOST``
(anonymous credentials) and an endpoint with explicit test keys (``AWS_TEST_ENVIRONMENT``,
instance metadata off), so nothing reaches for credentials over the network.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import requests

BIN = Path(sys.executable).parent
AWS_TEST_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class Emulator:
    """An emulator process on a loopback port; returns once it answers."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        self._wait_answering()

    def _wait_answering(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                requests.get(self.url, timeout=1)
                return
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise RuntimeError(f"emulator on port {self.port} did not start") from None
                time.sleep(0.1)

    @contextmanager
    def stopped(self) -> Iterator[None]:
        """The emulator frozen (SIGSTOP): calls to it hang until it is continued."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def cloud_storage_emulator(port: int, bucket: str, log: Path) -> Emulator:
    """gcp-storage-emulator in memory, ``bucket`` made."""
    return Emulator(
        [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port),
         "--in-memory", "--default-bucket", bucket],
        port,
        log,
    )  # fmt: skip


def s3_emulator(port: int, bucket: str, log: Path) -> Emulator:
    """moto's S3 server, ``bucket`` made."""
    emulator = Emulator([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, log)
    s3_client(emulator).create_bucket(Bucket=bucket)
    return emulator


def s3_client(emulator: Emulator) -> Any:
    """boto3's S3 client of ``emulator``, with the test keys."""
    keys = AWS_TEST_ENVIRONMENT
    return boto3.client(
        "s3",
        endpoint_url=emulator.url,
        aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
        region_name=keys["AWS_DEFAULT_REGION"],
    )
