"""A TCP proxy that delays every byte by a fixed time each way: a long link on loopback.

What a client reads arrives ``delay`` seconds after the other side sent it, in both directions,
so a round trip takes twice ``delay`` more than on loopback; bandwidth is not limited, so what
bounds a transfer is how much either side lets be in flight at once (TCP's and HTTP/2's
windows). Each connection to ``--listen`` is carried to ``--target``.

Run: ``python -m bench.delay_proxy --listen PORT --target PORT --delay SECONDS``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Sequence

_READ_BYTES = 1 << 20


async def _carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it was read."""
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            at, data = await due.get()
            if not data:
                return
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(_READ_BYTES)
            due.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await delivering
    except (ConnectionError, asyncio.CancelledError):
        delivering.cancel()
        raise
    finally:
        with contextlib.suppress(ConnectionError):
            writer.close()


async def serve(listen: int, target: int, delay: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _carry(reader, target_writer, delay),
            _carry(target_reader, writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(connection, "127.0.0.1", listen)
    print(f"delaying 127.0.0.1:{listen} -> {target} by {delay * 1000:g} ms each way", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.delay_proxy", description=__doc__)
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--delay", type=float, required=True, help="seconds each way")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.target, args.delay))


if __name__ == "__main__":
    main()
