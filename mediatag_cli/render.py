"""How the client commands show results: lines and tables for people, JSON for scripts.

Whatever came from a server (filenames, categories, context, tags, error messages) is
untrusted text: it is shown through :func:`shown`, so control characters and bidirectional
overrides appear as ``\\uXXXX`` and cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable, Sequence
from datetime import datetime

import grpc
from google.protobuf import duration_pb2, json_format, message, timestamp_pb2
from mediatag.analysis.v1 import analysis_pb2
from mediatag.ingest.v1 import ingest_pb2

from mediatag_common.errors import error_info, field_violations
from mediatag_common.untrusted_text import escaped

_STATUS_PREFIX = "PROCESSING_STATUS_"
# The two protos number ProcessingStatus identically; the ingest enum names both.
STATUS_VALUES: dict[str, int] = {
    name.removeprefix(_STATUS_PREFIX).lower(): number
    for name, number in ingest_pb2.ProcessingStatus.items()
    if number != ingest_pb2.PROCESSING_STATUS_UNSPECIFIED
}
TERMINAL_STATUSES = frozenset(
    {
        ingest_pb2.PROCESSING_STATUS_COMPLETED,
        ingest_pb2.PROCESSING_STATUS_FAILED,
        ingest_pb2.PROCESSING_STATUS_NOT_APPLICABLE,
    }
)
_EMBEDDING_PREVIEW = 6
_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB")


def status_name(value: int) -> str:
    """``3`` -> ``completed``; the short, lower-case name people type."""
    try:
        return ingest_pb2.ProcessingStatus.Name(value).removeprefix(_STATUS_PREFIX).lower()
    except ValueError:
        return f"status-{value}"


def parse_status(text: str) -> int:
    """A status from the command line, case-insensitive: ``failed``, ``NOT_APPLICABLE``,
    ``not-applicable`` or the full enum name; an argparse error otherwise."""
    key = text.strip().lower().replace("-", "_").removeprefix(_STATUS_PREFIX.lower())
    if key not in STATUS_VALUES:
        raise argparse.ArgumentTypeError(
            f"unknown status {text!r}; use one of {', '.join(STATUS_VALUES)}"
        )
    return STATUS_VALUES[key]


# ---- JSON ----


def to_dict(msg: message.Message) -> dict[str, object]:
    """The proto3 JSON mapping of ``msg``, with empty fields included so keys are stable."""
    return json_format.MessageToDict(msg, always_print_fields_with_no_presence=True)


def to_json(msg: message.Message, *, one_line: bool = False) -> str:
    """``msg`` as JSON: indented, or on one line for a stream of objects (JSON Lines)."""
    return json_text(to_dict(msg), one_line=one_line)


def json_text(value: object, *, one_line: bool = False) -> str:
    # json escapes C0 controls in strings itself (the newlines left are its indentation),
    # not C1 controls or bidirectional overrides.
    text = json.dumps(value, indent=None if one_line else 2, ensure_ascii=False)
    return escaped(text, keep="\n")


def shown(text: str) -> str:
    """Untrusted ``text`` as it may be printed: unsafe characters as ``\\uXXXX``."""
    return escaped(text)


# ---- small values ----


def format_time(value: timestamp_pb2.Timestamp, *, clock_only: bool = False) -> str:
    if value.seconds == 0 and value.nanos == 0:
        return "-"
    local = datetime.fromtimestamp(value.seconds + value.nanos / 1e9).astimezone()
    return local.strftime("%H:%M:%S" if clock_only else "%Y-%m-%d %H:%M:%S")


def format_duration(value: duration_pb2.Duration) -> str:
    seconds = value.seconds + value.nanos / 1e9
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def format_size(size: int) -> str:
    """``123`` -> ``123 B``, ``1536`` -> ``1.5 KiB``."""
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), len(_SIZE_UNITS))
    return f"{size / 1024**exponent:.1f} {_SIZE_UNITS[exponent - 1]}"


def _tags(tags: Sequence[str]) -> str:
    return ", ".join(tags) if tags else "-"


# ---- media ----


def media_line(media: ingest_pb2.Media) -> str:
    """One uploaded item: id, filename, status (and why it is not analysed)."""
    status = status_name(media.status)
    if media.not_applicable_reason:
        status += f" ({shown(media.not_applicable_reason)})"
    return f"{shown(media.id)}  {shown(media.filename)}  {status}"


def media_details(media: ingest_pb2.Media) -> str:
    """Every field of one item that has a value, one ``name: value`` line each."""
    rows: list[tuple[str, str]] = [
        ("id", media.id),
        ("owner", media.owner_id),
        ("category", media.category),
        ("context", ", ".join(f"{k}={v}" for k, v in sorted(media.context.items()))),
        ("filename", media.filename),
        ("type", _media_type(media)),
        ("size", format_size(media.size_bytes)),
        ("sha256", media.sha256),
        ("priority", str(media.priority)),
        ("status", f"{status_name(media.status)} (attempt {media.attempt})"),
        ("not analysed", media.not_applicable_reason),
        ("tags", ", ".join(media.tags)),
        ("analyzer", _analyzer(media.analyzer_name, media.analyzer_version, media.reused)),
        ("embedding", _embedding(media.embedding_dimensions, media.embedding)),
        ("error", _media_error(media)),
        ("created", format_time(media.create_time)),
        ("updated", format_time(media.update_time)),
        ("revision", str(media.status_revision)),
    ]
    filled = [(name, shown(value)) for name, value in rows if value]
    width = max(len(name) for name, _ in filled) + 1
    return "\n".join(f"{name + ':':<{width}} {value}" for name, value in filled)


def _media_type(media: ingest_pb2.Media) -> str:
    kind = ingest_pb2.MediaKind.Name(media.kind).removeprefix("MEDIA_KIND_").lower()
    dimensions = f", {media.width}x{media.height}" if media.width and media.height else ""
    return f"{media.content_type} ({kind}{dimensions})"


def _analyzer(name: str, version: str, reused: bool) -> str:
    if not name:
        return ""
    return f"{name} {version}".strip() + (" (result reused from cache)" if reused else "")


def _embedding(dimensions: int, values: Sequence[float]) -> str:
    if not dimensions:
        return ""
    if not values:
        return f"{dimensions} dimensions"
    preview = ", ".join(f"{v:.4f}" for v in values[:_EMBEDDING_PREVIEW])
    more = ", ..." if len(values) > _EMBEDDING_PREVIEW else ""
    return f"{dimensions} dimensions [{preview}{more}] (all values with --json)"


def _media_error(media: ingest_pb2.Media) -> str:
    if not media.HasField("error"):
        return ""
    error = media.error
    return f"{error.reason}: {error.message} (attempt {error.attempt})"


def media_table(items: Iterable[ingest_pb2.Media]) -> str:
    """A table of items: id, status, attempt, filename, size, created, tags."""
    header = ("ID", "STATUS", "ATTEMPT", "FILENAME", "SIZE", "CREATED", "TAGS")
    rows = [
        (
            media.id,
            status_name(media.status),
            str(media.attempt),
            media.filename,
            format_size(media.size_bytes),
            format_time(media.create_time),
            _tags(media.tags) if media.tags or not media.HasField("error") else media.error.reason,
        )
        for media in items
    ]
    return table(header, [[shown(cell) for cell in row] for row in rows])


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart; the last column is not padded."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


# ---- webhook deliveries ----

# The states ``mediatag webhooks --state`` takes.
DELIVERY_STATES: dict[str, ingest_pb2.WebhookDeliveryState] = {
    "retrying": ingest_pb2.WEBHOOK_DELIVERY_STATE_RETRYING,
    "dead": ingest_pb2.WEBHOOK_DELIVERY_STATE_DEAD,
}


def delivery_table(deliveries: Iterable[ingest_pb2.WebhookDelivery]) -> str:
    """A table of webhook deliveries; WHEN is when a dead one died, or when a retried one is
    due."""
    header = ("ID", "ENDPOINT", "MEDIA", "OWNER", "CHANGE", "STATE", "ATTEMPTS", "WHEN", "ERROR")
    dead = ingest_pb2.WEBHOOK_DELIVERY_STATE_DEAD
    rows = [
        (
            str(delivery.id),
            delivery.endpoint,
            delivery.media_id,
            delivery.owner_id,
            status_name(delivery.status),
            "dead" if delivery.state == dead else "retrying",
            str(delivery.attempts),
            format_time(
                delivery.dead_time if delivery.state == dead else delivery.next_attempt_time
            ),
            delivery.last_error or "-",
        )
        for delivery in deliveries
    ]
    return table(header, [[shown(cell) for cell in row] for row in rows])


# ---- queue ----


def queue_summary(status: analysis_pb2.GetQueueStatusResponse) -> str:
    """The queue at a glance, for people."""
    counts = {int(count.status): count.count for count in status.counts}
    jobs = ", ".join(f"{name} {counts.get(value, 0)}" for name, value in STATUS_VALUES.items())
    rows = [
        ("queue", "paused" if status.paused else "running"),
        ("analyzer", shown(f"{status.analyzer_name} {status.analyzer_version}".strip() or "-")),
        ("workers", f"{status.workers_busy} busy of {status.workers_total}"),
        ("jobs", jobs),
        ("done last minute", str(status.completed_last_minute)),
        ("oldest pending", _optional_duration(status, "oldest_pending_age")),
        ("estimated wait", _optional_duration(status, "estimated_wait")),
        ("revision", str(status.current_revision)),
    ]
    width = max(len(name) for name, _ in rows) + 1
    lines = [f"{name + ':':<{width}} {value}" for name, value in rows]
    if status.replicas:
        lines.append("replicas:")
        lines.extend(
            "  " + line
            for line in table(
                ("REPLICA", "HOST", "PID", "WORKERS", "STARTED", "LAST SEEN", "STATE"),
                [
                    (
                        replica.replica_id,
                        shown(replica.host),
                        str(replica.pid),
                        f"{replica.workers_busy} busy of {replica.workers_total}",
                        format_time(replica.start_time),
                        format_time(replica.last_seen_time, clock_only=True),
                        _replica_state(replica, status.replica_id),
                    )
                    for replica in status.replicas
                ],
            ).splitlines()
        )
    if status.rate_limits:
        lines.append("rate limits:")
        lines.extend(
            "  " + line
            for line in table(
                ("API", "RATE", "BURST", "IN USE", "QUOTA ERRORS", "THROTTLED UNTIL"),
                [
                    (
                        limit.api,
                        f"{limit.rate_per_second:g}/s",
                        str(limit.burst),
                        f"{limit.current_use:.0%}",
                        str(limit.quota_errors),
                        format_time(limit.throttled_until, clock_only=True),
                    )
                    for limit in status.rate_limits
                ],
            ).splitlines()
        )
    return "\n".join(lines)


def _replica_state(replica: analysis_pb2.Replica, answering: str) -> str:
    if replica.state == analysis_pb2.REPLICA_STATE_GONE:
        return "gone"
    return "live (answered)" if replica.replica_id == answering else "live"


def _optional_duration(status: analysis_pb2.GetQueueStatusResponse, name: str) -> str:
    if not status.HasField(name):
        return "-"
    value: duration_pb2.Duration = getattr(status, name)
    return format_duration(value)


# ---- watch ----


def change_line(response: analysis_pb2.WatchStatusResponse) -> str | None:
    """One status event as a line; ``None`` for a bookmark (shown only as JSON)."""
    if not response.HasField("change"):
        return None
    change = response.change
    if change.initial_state:
        transition = f"{status_name(change.status)} (current state)"
    elif change.previous_status == analysis_pb2.PROCESSING_STATUS_UNSPECIFIED:
        transition = f"submitted -> {status_name(change.status)}"
    else:
        transition = f"{status_name(change.previous_status)} -> {status_name(change.status)}"
    line = (
        f"{format_time(change.event_time, clock_only=True)} #{response.revision} "
        f"{shown(change.media_id)} {transition} attempt {change.attempt}"
    )
    return line + change_outcome(change)


def change_outcome(change: analysis_pb2.StatusChange) -> str:
    """What a change brought: tags, an error, or when the next attempt may start."""
    if change.status == analysis_pb2.PROCESSING_STATUS_COMPLETED:
        reused = " (reused)" if change.result.reused else ""
        return f" tags: {shown(_tags(change.result.tags))}{reused}"
    if not change.HasField("error"):
        return ""
    error = shown(f"{change.error.reason}: {change.error.message}")
    if change.status == analysis_pb2.PROCESSING_STATUS_PENDING:
        retry_at = format_time(change.next_attempt_time, clock_only=True)
        return f" retry at {retry_at} after {error}"
    return f" error {error}"


# ---- errors ----


def rpc_error_lines(error: grpc.aio.AioRpcError, service: str, address: str) -> list[str]:
    """``error: <CODE> <reason>: <message>`` and one line per field violation."""
    code = error.code()
    info = error_info(error)
    details = error.details() or ""
    if info is None and code == grpc.StatusCode.UNAVAILABLE:
        return [f"error: cannot reach the {service} service at {address} ({shown(details)})"]
    if info is None and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return [
            f"error: DEADLINE_EXCEEDED: the {service} service at {address} did not answer in time"
        ]
    # INTERNAL INTERNAL says nothing twice: the reason is shown when it adds something.
    reason = f" {info.reason}" if info is not None and info.reason not in ("", code.name) else ""
    lines = [f"error: {code.name}{shown(reason)}: {shown(details)}"]
    lines.extend(shown(f"  {v.field}: {v.description}") for v in field_violations(error))
    return lines
