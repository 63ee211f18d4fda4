"""The one place logging handlers are configured: text for people, or JSON lines.

Text: ``HH:MM:SS LEVEL logger message key=value ...``. JSON: one object per line with
``time``, ``level``, ``logger``, ``message`` and every ``extra`` field (``media_id``,
``attempt``, ``duration_ms``, ...). Byte strings and secret-looking fields are never printed;
control characters and bidirectional overrides in what is printed appear as ``\\uXXXX``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from mediatag_common.untrusted_text import escaped

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}
_SECRET_MARKERS = ("token", "authorization", "password", "secret")
# Below WARNING these log every SQL statement and every aiosqlite call.
_QUIET_LOGGERS = ("aiosqlite", "sqlalchemy")


def short_logger_name(name: str) -> str:
    """``analysis_service.workers`` -> ``analysis.workers``; ``mediatag_common.x`` -> ``common.x``.

    Other loggers (``sqlalchemy.engine``) keep their names.
    """
    head, dot, rest = name.partition(".")
    head = head.removeprefix("mediatag_").removesuffix("_service")
    return head + dot + rest


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The ``extra`` fields of ``record``, with bytes and secrets replaced by placeholders."""
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _STANDARD_ATTRIBUTES or key.startswith("_"):
            continue
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            fields[key] = "[redacted]"
        elif isinstance(value, bytes | bytearray | memoryview):
            fields[key] = f"<{len(value)} bytes>"
        else:
            fields[key] = value
    return fields


class TextFormatter(logging.Formatter):
    """``12:03:04 INFO    analysis.workers completed abc123 media_id=abc123 duration_ms=41``."""

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        # Escaped: a message may quote what a client sent (a filename), and one line per record
        # must stay one line that drives no terminal. The traceback below is the service's own.
        line = (
            f"{time} {record.levelname:<7} {short_logger_name(record.name)} "
            f"{escaped(record.getMessage())}"
        )
        fields = extra_fields(record)
        if fields:
            line += " " + " ".join(
                f"{key}={escaped(_text_value(value))}" for key, value in fields.items()
            )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(item) for item in value)
    text = str(value)
    return json.dumps(text) if not text or any(c.isspace() for c in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # json escapes C0 controls itself, not C1 controls or bidirectional overrides.
        return escaped(json.dumps(entry, default=str, ensure_ascii=False))


def configure_logging(
    level: str = "INFO", log_format: str = "text", stream: TextIO | None = None
) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) in ``log_format``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    numeric_level = logging.getLevelName(level)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))
    logging.captureWarnings(True)
