"""The fake Google APIs of ``tests/google_fakes.py`` as a process of their own.

Tests that run the analysis service as several processes point every replica here, so each
upstream call is counted where it arrives, the calls of a replica killed mid-run included.

Run: ``python -m tests.google_api_process --vision-port P --vertex-port Q --calls FILE``.
On SIGTERM it writes every call it received to FILE, one JSON object a line (``method``;
``at``, the arrival on the machine's monotonic clock; ``sha256`` of each image sent to
Vision), and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import signal
from collections.abc import Sequence
from pathlib import Path

from tests.google_fakes import ANNOTATE, FakeVertex, FakeVision

# Vision's answer for every image: one label above the default minimum score (one tag).
LABELS = [("Hair", 0.97)]
# The embedding dimensions the replicas ask for (``--embedding-dimensions``).
DIMENSIONS = 128


def calls_of(vision: FakeVision, vertex: FakeVertex) -> list[dict[str, object]]:
    """Every call both fakes received, in order of arrival."""
    calls: list[dict[str, object]] = []
    for fake in (vision, vertex):
        for method, received in fake.received.items():
            for call in received:
                images = (
                    [hashlib.sha256(one.image.content).hexdigest() for one in call.request.requests]
                    if method == ANNOTATE
                    else []
                )
                calls.append({"method": method, "at": call.at, "sha256": images})
    return sorted(calls, key=lambda call: float(str(call["at"])))


async def serve(vision_port: int, vertex_port: int, calls_file: Path) -> None:
    vision = FakeVision(labels=LABELS, port=vision_port)
    vertex = FakeVertex(
        vector=[math.sin(i * 0.37) + 0.1 for i in range(DIMENSIONS)], port=vertex_port
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await vision.start()
    await vertex.start()
    try:
        await stop.wait()
    finally:
        await vision.stop()
        await vertex.stop()
        lines = (json.dumps(call) + "\n" for call in calls_of(vision, vertex))
        await asyncio.to_thread(calls_file.write_text, "".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.google_api_process")
    parser.add_argument("--vision-port", type=int, required=True)
    parser.add_argument("--vertex-port", type=int, required=True)
    parser.add_argument("--calls", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.vision_port, args.vertex_port, args.calls))


if __name__ == "__main__":
    main()
