"""Debian's Chromium for the browser tests and the dashboard screenshot, driven by Playwright.

Playwright's own browser download cannot work here, so Chromium is the system's
(``make test`` installs it), started once per test session in its own process with an empty
profile and everything that would reach the network off; each test connects to it over the
DevTools protocol with Playwright and works in a context of its own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from playwright.async_api import BrowserContext, async_playwright, expect

CHROMIUM = Path("/usr/bin/chromium")
# What Chromium needs here: root (no sandbox), no GPU, and no calls home.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
)
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
# How long a page may take to show what a test expects (each expectation returns as soon as
# it holds); CI machines are shared and loaded.
WITHIN_MS = 30_000
expect.set_options(timeout=WITHIN_MS)


class Chromium:
    """One Chromium process; ``endpoint`` is its DevTools address."""

    def __init__(self, start_within: float = 30.0) -> None:
        if not CHROMIUM.exists():
            raise RuntimeError(f"the browser tests need Chromium at {CHROMIUM}: run `make test`")
        self._profile = tempfile.TemporaryDirectory(prefix="mediatag-chromium-")
        self._process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # A process group of its own: see close().
            start_new_session=True,
        )
        found: list[str] = []
        listening = threading.Event()
        reader = threading.Thread(target=self._read_endpoint, args=(found, listening), daemon=True)
        reader.start()
        if not listening.wait(start_within) or not found:
            self.close()
            raise RuntimeError(f"Chromium did not open its DevTools port within {start_within} s")
        self.endpoint = found[0]

    def _read_endpoint(self, found: list[str], listening: threading.Event) -> None:
        assert self._process.stderr is not None
        for line in self._process.stderr:
            match = _LISTENING.search(line)
            if match:
                found.append(match.group(1))
                break
        listening.set()
        # Keep draining, so Chromium never blocks on a full pipe.
        for _ in self._process.stderr:
            pass

    def close(self, within: float = 10.0) -> None:
        """Stop Chromium and every helper it started, then remove the profile.

        The helpers (network, storage, renderers) outlive the browser's own process for a
        moment and write in the profile meanwhile (a loaded machine once failed the removal
        with "Directory not empty"): the whole process group goes before the profile does.
        """
        group = self._process.pid
        _signal_group(group, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=within)
        _signal_group(group, signal.SIGKILL)
        self._process.wait()
        deadline = time.monotonic() + within
        while _group_alive(group):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Chromium's helpers still run {within} s after SIGKILL")
            time.sleep(0.05)
        self._profile.cleanup()

    @asynccontextmanager
    async def context(self, height: int = 900) -> AsyncIterator[BrowserContext]:
        """A fresh browser context (its own cookies and storage) in this loop."""
        async with async_playwright() as playwright:
            browser = await playwright.chromium.connect_over_cdp(self.endpoint)
            context = await browser.new_context(viewport={"width": 1280, "height": height})
            context.set_default_timeout(WITHIN_MS)
            try:
                yield context
            finally:
                await context.close()


def _signal_group(group: int, signal_number: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(group, signal_number)


def _group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs (zombies, which write nothing, do not
    count: the helpers' new parent may be slow to reap them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ")".
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state not in ("Z", "X"):
                return True
    return False
