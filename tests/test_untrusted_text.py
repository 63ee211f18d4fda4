"""Text a client sent, shown to someone else: the CLI and the log lines print control
characters and bidirectional overrides as escapes, never raw (issue 12, item 8). What the
services refuse outright is in tests/test_bad_input.py."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable

import pytest
from mediatag.ingest.v1 import ingest_pb2 as ipb

from mediatag_cli.logging_setup import JsonFormatter, TextFormatter
from mediatag_cli.main import run_client
from tests import media_samples as samples
from tests.conftest import Cluster

# Clear the screen, then CSI as one C1 character, then a right-to-left override: context
# values are free text, so the service stores them; whoever reads them must not be hurt.
HOSTILE = "\x1b[2J\x9b31mred\u202eevil\u2066"
RAW = ("\x1b", "\x9b", "\u202e", "\u2066")


def assert_no_raw_controls(text: str) -> None:
    for character in RAW:
        assert character not in text, repr(text)


async def test_the_cli_shows_hostile_context_as_escapes(
    make_cluster: Callable[..., Cluster],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = make_cluster()
    await cluster.start_ingest()
    response = await cluster.ingest.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id="listing-7",
            context={"note": HOSTILE},
            files=[ipb.MediaFile(filename="a.jpg", content=samples.jpeg_bytes(95))],
        )
    )
    media_id = response.media[0].id
    monkeypatch.delenv("MEDIATAG_TOKEN", raising=False)
    addresses = [
        "--ingest", f"127.0.0.1:{cluster.ingest_port}",
        "--analysis", f"127.0.0.1:{cluster.analysis_port}",
    ]  # fmt: skip
    capsys.readouterr()

    assert await run_client(["get", media_id, *addresses]) == 0
    shown = capsys.readouterr().out
    assert_no_raw_controls(shown)
    assert "note=\\u001b[2J\\u009b31mred\\u202eevil\\u2066" in shown

    assert await run_client(["get", media_id, "--json", *addresses]) == 0
    printed = capsys.readouterr().out
    assert_no_raw_controls(printed)
    # Still JSON, and still the value the service stored.
    assert json.loads(printed)["media"]["context"]["note"] == HOSTILE


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()])
def test_log_lines_show_hostile_text_as_escapes(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("tests.untrusted")
    logger.addHandler(handler)
    try:
        logger.warning("stored %s", f"clip{HOSTILE}.mp4\nfake line", extra={"note": HOSTILE})
    finally:
        logger.removeHandler(handler)
    written = stream.getvalue()
    assert_no_raw_controls(written)
    # One record, one line: a newline a client sent cannot forge the next one.
    assert written.count("\n") == 1
    if isinstance(formatter, JsonFormatter):
        assert json.loads(written)["note"] == HOSTILE
