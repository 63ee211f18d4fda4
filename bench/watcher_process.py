"""Many WatchStatus streams in a process of their own (``bench.watchers``' pool).

A benchmark that times work through its own event loop must not also read a thousand
streams in it: the streams' messages would delay its calls and its timer, and their CPU could
not be told apart from the rest of its own. The process opens the streams, says so with one
line on stdout, keeps them until its stdin closes, then prints what they read as JSON.

Run: ``python -m bench.watcher_process --address HOST:PORT --count N --channels N``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from bench.processes import PACKAGE_PARENT
from bench.watchers import watching

_OPENED = "opened"
_STOP_TIMEOUT = 30.0


@dataclass
class WatcherProcess:
    """The process's pid while it runs; afterwards what its streams read: how many changes,
    when the first and the last were read (``time.time_ns()``, 0 when none), and how many
    streams the server ended, by status code."""

    pid: int
    changes: int = 0
    first_read_ns: int = 0
    last_read_ns: int = 0
    ended: dict[str, int] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def watching_apart(
    address: str, *, count: int, channels: int, open_timeout: float
) -> AsyncIterator[WatcherProcess]:
    """``count`` streams to ``address`` held by another process for the length of the block."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.watcher_process", "--address", address,
        "--count", str(count), "--channels", str(channels), "--open-timeout", str(open_timeout),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=PACKAGE_PARENT,
    )  # fmt: skip
    assert process.stdin is not None
    assert process.stdout is not None
    watchers = WatcherProcess(process.pid)
    try:
        async with asyncio.timeout(open_timeout + _STOP_TIMEOUT):
            line = (await process.stdout.readline()).decode().strip()
        if line != _OPENED:
            raise RuntimeError(f"the watchers' process did not open its streams: {line!r}")
        yield watchers
        process.stdin.close()
        async with asyncio.timeout(_STOP_TIMEOUT):
            read = json.loads(await process.stdout.read())
            # Waited for here, not killed below: signalling a process that has exited but is
            # not yet reaped reaps it behind asyncio's back ("Unknown child process").
            await process.wait()
        watchers.changes, watchers.ended = read["changes"], read["ended"]
        watchers.first_read_ns, watchers.last_read_ns = read["first_read_ns"], read["last_read_ns"]
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()


async def _hold(args: argparse.Namespace) -> None:
    async with watching(
        args.address, count=args.count, channels=args.channels, open_timeout=args.open_timeout
    ) as pool:
        print(_OPENED, flush=True)
        # Until the benchmark closes stdin (or exits).
        await asyncio.to_thread(sys.stdin.read)
        read_ns = pool.receipts.received_ns
    read = {
        "changes": len(read_ns),
        "first_read_ns": min(read_ns, default=0),
        "last_read_ns": max(read_ns, default=0),
        "ended": dict(pool.ended),
    }
    print(json.dumps(read), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.watcher_process", description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--open-timeout", type=float, required=True)
    asyncio.run(_hold(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
