"""The ``mediatag`` command: ``serve`` the services, or talk to them as a client."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import NoReturn

from mediatag_cli.blob_copy import copy_blobs
from mediatag_cli.client_commands import run_command
from mediatag_cli.database_copy import copy_service_database
from mediatag_cli.logging_setup import configure_logging
from mediatag_cli.render import DELIVERY_STATES, parse_status
from mediatag_cli.serve import serve
from mediatag_cli.settings import (
    ANALYSIS,
    INGEST,
    SERVICES,
    WEB,
    SettingsError,
    add_client_arguments,
    add_serve_arguments,
    client_settings,
    serve_settings,
)
from mediatag_common.database import SQLITE, database_url
from mediatag_common.service_config import ServiceConfig
from mediatag_common.tls import TlsFileError
from mediatag_common.values import (
    int32,
    key_value,
    non_negative_int,
    positive_float,
    positive_int,
)

# Exit status after Ctrl-C, as shells report it (128 + SIGINT).
_INTERRUPTED = 130
_DESCRIPTION = """\
Instant media uploads, asynchronous AI analysis.

Run both services with `mediatag serve`, then upload with
`mediatag upload photo.jpg --owner listing-1 --watch`.
Settings come from flags, then MEDIATAG_* environment variables, then defaults.
"""


def _command_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Remember which parser a command came from, to report its usage errors."""
    parser.set_defaults(command_parser=parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command and flag."""
    parser = argparse.ArgumentParser(
        prog="mediatag",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = _command_parser(
        commands.add_parser(
            "serve",
            help="run both services and the web gateway in one process (or one of them)",
            usage="mediatag serve [ingest | analysis | web] [options]",
            description="Run the ingest and analysis services and the web gateway in one "
            "process, or one of them. Each flag can also be set by the environment variable "
            "named in its help.",
        )
    )
    add_serve_arguments(serve, SERVICES)
    services = serve.add_subparsers(dest="service", metavar="SERVICE", prog="mediatag serve")
    for name, what in (
        (INGEST, "the ingest service"),
        (ANALYSIS, "the analysis service"),
        (WEB, "the web gateway (dashboard, JSON API, Server-Sent Events) for remote services"),
    ):
        add_serve_arguments(
            _command_parser(
                services.add_parser(
                    name,
                    help=f"run only {what}",
                    description=f"Run only {what}. Each flag can also be set by the "
                    "environment variable named in its help.",
                )
            ),
            [name],
        )

    copy_blobs = _command_parser(
        commands.add_parser(
            "copy-blobs",
            help="copy a local blob directory into the blob store (to move to a bucket)",
            usage="mediatag copy-blobs DIR [serve ingest options]",
            description="Copy every blob of DIR (a local blob directory, DATA_DIR/ingest/blobs) "
            "into the blob store that `mediatag serve ingest` with the same options uses "
            "(--blob-store). Blobs already there are skipped, so it can run again, also "
            "while the service runs.",
        )
    )
    copy_blobs.add_argument("source", type=Path, metavar="DIR", help="the blob directory")
    add_serve_arguments(copy_blobs, [INGEST])

    copy_database = _command_parser(
        commands.add_parser(
            "copy-database",
            help="copy a service's database into a new one (to move from SQLite to PostgreSQL)",
            usage="mediatag copy-database {ingest | analysis} --to URL [serve options]",
            description="Copy every row of a service's database (the one `mediatag serve "
            "SERVICE` with the same options uses) into a new, empty database, e.g. "
            "postgresql://USER@HOST:PORT/DB. Stop every process of the service first. Both "
            "databases are migrated to this release's schema; a destination that holds rows "
            "is refused; the copy is one transaction.",
        )
    )
    copied_services = copy_database.add_subparsers(
        dest="service", metavar="SERVICE", required=True, prog="mediatag copy-database"
    )
    for name in (INGEST, ANALYSIS):
        service = _command_parser(
            copied_services.add_parser(
                name,
                help=f"copy the {name} service's database",
                description=f"Copy the {name} database (the one `mediatag serve {name}` "
                "with the same options uses) into the empty database at --to. Stop every "
                f"process of the {name} service first.",
            )
        )
        service.add_argument(
            "--to",
            required=True,
            metavar="URL",
            help="the new database, e.g. postgresql://USER@HOST:PORT/DB",
        )
        add_serve_arguments(service, [name])

    def client(name: str, summary: str) -> argparse.ArgumentParser:
        command = _command_parser(commands.add_parser(name, help=summary, description=summary))
        add_client_arguments(command)
        return command

    upload = client("upload", "upload files; images are analysed in the background")
    upload.add_argument("files", nargs="+", metavar="FILE", help="image or video files")
    upload.add_argument("--owner", required=True, metavar="ID", help="owner of the media")
    upload.add_argument("--category", default="", help="category, e.g. Hair")
    upload.add_argument(
        "--context",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="context for the analyser; repeatable",
    )
    upload.add_argument(
        "--priority", type=int32, default=0, metavar="N", help="higher is analysed first"
    )
    upload.add_argument(
        "--watch",
        action="store_true",
        help="follow the analysis until every image is done; exit 1 if any failed",
    )

    watch = client("watch", "stream status changes (Ctrl-C to stop)")
    watch.add_argument("media_ids", nargs="*", metavar="MEDIA_ID", help="only these items")
    watch.add_argument("--owner", default="", metavar="ID", help="only this owner's items")
    watch.add_argument(
        "--since",
        type=non_negative_int,
        default=0,
        metavar="REVISION",
        help="every change after this revision (default: from now)",
    )
    watch.add_argument(
        "--initial", action="store_true", help="first show the current state of every item"
    )
    watch.add_argument(
        "--until-terminal",
        action="store_true",
        help="stop once every MEDIA_ID is completed, failed or not applicable (also if it "
        "already was); an id ingest does not know is an error; exit 1 if any failed",
    )

    get = client("get", "show one item")
    get.add_argument("media_id", metavar="MEDIA_ID")
    get.add_argument("--embedding", action="store_true", help="include the embedding vector")

    ls = client("ls", "list an owner's items, newest first")
    ls.add_argument("--owner", required=True, metavar="ID")
    ls.add_argument(
        "--status",
        type=parse_status,
        default=0,
        metavar="STATUS",
        help="pending, processing, completed, failed or not_applicable",
    )
    ls.add_argument("--limit", type=positive_int, metavar="N", help="at most N items")

    queue = client("queue", "show the analysis queue: counts, workers, rate limits, wait")
    queue.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=positive_float,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )

    retry = client("retry", "send items back to analysis")
    retry.add_argument("media_ids", nargs="*", metavar="MEDIA_ID")
    retry.add_argument("--failed", action="store_true", help="every failed item")
    retry.add_argument("--owner", default="", metavar="ID", help="with --failed: only this owner")

    client("pause", "stop workers from claiming new jobs")
    client("resume", "let workers claim jobs again")

    webhooks = client("webhooks", "list webhook deliveries not yet accepted, newest first")
    webhooks.add_argument(
        "--state",
        choices=sorted(DELIVERY_STATES),
        help="dead: out of retries; retrying: still retried (default: both)",
    )
    webhooks.add_argument("--endpoint", default="", metavar="NAME", help="only this endpoint's")
    webhooks.add_argument("--owner", default="", metavar="ID", help="only this owner's")
    webhooks.add_argument("--limit", type=positive_int, metavar="N", help="at most N deliveries")

    retry_webhooks = client("retry-webhooks", "send dead webhook deliveries again (admin)")
    retry_webhooks.add_argument("delivery_ids", nargs="*", type=positive_int, metavar="DELIVERY_ID")
    retry_webhooks.add_argument(
        "--endpoint",
        default="",
        metavar="NAME",
        help="every dead delivery to this endpoint (with ids: those of them to it)",
    )
    return parser


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; usage errors exit with status 2."""
    args = build_parser().parse_args(argv)
    if args.command == "watch":
        if args.until_terminal and not args.media_ids:
            _usage_error(args, "--until-terminal needs the MEDIA_IDs to wait for")
        if args.since and args.initial:
            _usage_error(
                args,
                "--since and --initial do not go together: the current state replaces the "
                "changes since REVISION",
            )
    if args.command == "retry":
        if bool(args.media_ids) == bool(args.failed):
            _usage_error(args, "give either MEDIA_ID... or --failed")
        if args.owner and not args.failed:
            _usage_error(args, "--owner goes with --failed")
    if args.command == "retry-webhooks" and not (args.delivery_ids or args.endpoint):
        _usage_error(args, "give DELIVERY_ID... or --endpoint")
    return args


async def run_client(argv: list[str]) -> int:
    """Run a client command on the running event loop (as tests do); its exit status."""
    return await _run_client(parse(argv))


async def _run_client(args: argparse.Namespace) -> int:
    try:
        client = client_settings(args)
        if client.tls is not None:
            # Read and checked before the first call: a bad file is the command line's fault.
            client.tls.credentials()
    except (SettingsError, TlsFileError) as error:
        _usage_error(args, str(error))
    return await run_command(args, client)


def run(argv: list[str] | None = None) -> int:
    """Run ``mediatag`` with ``argv`` (default: the process's); its exit status."""
    args = parse(argv)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "copy-blobs":
        return _run_copy_blobs(args)
    if args.command == "copy-database":
        return _run_copy_database(args)
    configure_logging("WARNING")
    try:
        return asyncio.run(_run_client(args))
    except KeyboardInterrupt:
        # Stopping a watch is how it is meant to end.
        watching = args.command == "watch" or (args.command == "queue" and args.watch is not None)
        return 0 if watching else _INTERRUPTED


def _run_serve(args: argparse.Namespace) -> int:
    services = (args.service,) if args.service else SERVICES
    try:
        settings = serve_settings(args, services)
    except SettingsError as error:
        _usage_error(args, str(error))
    configure_logging(settings.log_level, settings.log_format)
    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return _INTERRUPTED


def _run_copy_blobs(args: argparse.Namespace) -> int:
    try:
        ingest = serve_settings(args, [INGEST]).ingest
    except SettingsError as error:
        _usage_error(args, str(error))
    assert ingest is not None
    source: Path = args.source
    if not source.is_dir():
        _usage_error(args, f"{source} is no directory")
    location = ingest.blob_store_location
    if location.scheme == "file" and Path(location.path).resolve() == source.resolve():
        _usage_error(args, f"{source} is the blob store itself (give --blob-store)")
    configure_logging("WARNING")
    try:
        return asyncio.run(copy_blobs(source, ingest))
    except KeyboardInterrupt:
        # The copy said what it copied.
        return _INTERRUPTED


def _run_copy_database(args: argparse.Namespace) -> int:
    service: str = args.service
    try:
        config: ServiceConfig = getattr(serve_settings(args, [service]), service)
        source = database_url(config.resolved_database_url)
        database_url(args.to)
    except (SettingsError, ValueError) as error:
        _usage_error(args, str(error))
    # Opening a missing SQLite file would make an empty database there.
    if source.get_backend_name() == SQLITE and not Path(source.database or "").is_file():
        _usage_error(
            args,
            f"no {service} database at {source.database} "
            f"(give --data-dir or --{service}-database-url)",
        )
    configure_logging("WARNING")
    try:
        return asyncio.run(copy_service_database(service, config.resolved_database_url, args.to))
    except KeyboardInterrupt:
        # The copy said what it left, if it had begun.
        return _INTERRUPTED


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    try:
        status = run(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`mediatag watch | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    raise SystemExit(status)
