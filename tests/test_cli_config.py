"""The ``mediatag`` command's configuration, argument parsing and log format (servers only to
see a setting refused or left out at start)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from mediatag.ingest.v1 import ingest_pb2

from analysis_service.analyzers.registry import build_analyzer, close_analyzer
from analysis_service.config import (
    ANALYZER_APIS,
    AnalysisConfig,
    GoogleConfig,
    RateLimitConfig,
    rate_limits,
)
from ingest_service.config import IngestConfig
from mediatag_cli.logging_setup import JsonFormatter, TextFormatter
from mediatag_cli.main import parse, run_client
from mediatag_cli.render import parse_status, status_name
from mediatag_cli.settings import (
    SERVICES,
    ServeSettings,
    SettingsError,
    client_settings,
    serve_settings,
)
from mediatag_common.values import byte_size
from tests.conftest import free_port, skip_without_google_extra
from tests.processes import Serve, run_cli, run_json

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_mediatag_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MEDIATAG_"):
            monkeypatch.delenv(name)


def settings_for(command_line: str = "") -> ServeSettings:
    """The settings of ``mediatag serve <command_line>``."""
    args = parse(["serve", *command_line.split()])
    services = (args.service,) if args.service else SERVICES
    return serve_settings(args, services)


def both(settings: ServeSettings) -> tuple[Any, Any]:
    assert settings.ingest is not None
    assert settings.analysis is not None
    return settings.ingest, settings.analysis


# ---- precedence: flag, then environment, then default ----

PRECEDENCE_CASES: list[tuple[str, str, str, str, Callable[[ServeSettings], object], object]] = [
    # flag, environment variable, flag value, env value, what it sets, default
    ("--workers", "MEDIATAG_WORKERS", "12", "8", lambda s: both(s)[1].workers, 4),
    ("--host", "MEDIATAG_HOST", "127.0.0.3", "127.0.0.2", lambda s: both(s)[0].host, "127.0.0.1"),
    ("--ingest-port", "MEDIATAG_INGEST_PORT", "7001", "7000", lambda s: both(s)[0].port, 50051),
    (
        "--data-dir", "MEDIATAG_DATA_DIR", "/srv/flag", "/srv/env",
        lambda s: both(s)[1].data_dir, Path("data/analysis"),
    ),
    (
        "--max-attempts", "MEDIATAG_MAX_ATTEMPTS", "5", "4",
        lambda s: both(s)[1].retry.max_attempts, 3,
    ),
    ("--log-level", "MEDIATAG_LOG_LEVEL", "debug", "warning", lambda s: s.log_level, "INFO"),
    ("--grace-period", "MEDIATAG_GRACE_PERIOD", "0", "2.5", lambda s: s.grace_period, 10.0),
    (
        "--ingest-metrics-port", "MEDIATAG_INGEST_METRICS_PORT", "9001", "9000",
        lambda s: both(s)[0].metrics_port, 9451,
    ),
    (
        "--analysis-metrics-port", "MEDIATAG_ANALYSIS_METRICS_PORT", "9003", "off",
        lambda s: both(s)[1].metrics_port, 9452,
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "env", "flag_value", "env_value", "read", "default"), PRECEDENCE_CASES
)
def test_a_flag_beats_the_environment_which_beats_the_default(
    monkeypatch: pytest.MonkeyPatch,
    flag: str,
    env: str,
    flag_value: str,
    env_value: str,
    read: Callable[[ServeSettings], object],
    default: object,
) -> None:
    assert read(settings_for()) == default

    monkeypatch.setenv(env, env_value)
    from_env = read(settings_for())
    assert from_env != default

    from_flag = read(settings_for(f"{flag} {flag_value}"))
    assert from_flag not in (default, from_env)


def test_values_are_parsed_the_same_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIATAG_WORKERS", "8")
    monkeypatch.setenv("MEDIATAG_LOG_LEVEL", "debug")
    monkeypatch.setenv("MEDIATAG_MAX_IMAGE_BYTES", "5MiB")
    settings = settings_for()
    ingest, analysis = both(settings)
    assert analysis.workers == 8
    assert settings.log_level == "DEBUG"
    assert ingest.limits.max_image_bytes == 5 * MIB


def test_an_empty_environment_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIATAG_WORKERS", "")
    assert both(settings_for())[1].workers == 4


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIATAG_WORKERS", "many")
    with pytest.raises(SettingsError, match="MEDIATAG_WORKERS"):
        settings_for()


def test_a_variable_for_the_other_service_does_not_stop_this_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIATAG_WORKERS", "many")
    settings = settings_for("ingest")
    assert settings.ingest is not None
    assert settings.analysis is None


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--workers", "-1"],
        ["serve", "--ingest-port", "70000"],
        ["serve", "--backoff-base", "-1"],
        ["serve", "--lease-seconds", "nan"],
        ["serve", "--log-format", "xml"],
        ["serve", "--sqlite-synchronous", "sometimes"],
        ["serve", "--max-image-bytes", "1.5G"],
        ["serve", "--analyzer", "no-such-analyzer"],
        ["serve", "ingest", "--workers", "2"],
        ["serve", "--ingest-metrics-port", "on"],
        ["serve", "analysis", "--max-connections", "0"],
        ["serve", "--analysis-metrics-port", "65536"],
        ["serve", "ingest", "--analysis-metrics-port", "9452"],
        ["ls", "--owner", "o", "--status", "done"],
        ["upload", "a.jpg", "--owner", "o", "--context", "no-equals-sign"],
        ["upload", "a.jpg", "--owner", "o", "--priority", str(2**31)],
        ["retry"],
        ["retry", "m1", "--failed"],
        ["retry", "m1", "--owner", "o"],
        ["retry-webhooks"],
        ["retry-webhooks", "x"],
        ["webhooks", "--state", "gone"],
    ],
)
def test_bad_arguments_are_usage_errors_not_tracebacks(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        [], ["serve"], ["serve", "ingest"], ["serve", "analysis"], ["upload"], ["watch"],
        ["get"], ["ls"], ["queue"], ["retry"], ["pause"], ["resume"], ["webhooks"],
        ["retry-webhooks"],
    ],
)  # fmt: skip
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: mediatag" in capsys.readouterr().out


# ---- rate limits ----


def test_rate_limits_take_a_rate_and_an_optional_burst() -> None:
    assert rate_limits("local=2:1,vision=30") == {
        "local": RateLimitConfig(rate_per_second=2.0, burst=1),
        "vision": RateLimitConfig(rate_per_second=30.0, burst=1),
    }
    assert rate_limits(" gemini = 0.5:4 ") == {"gemini": RateLimitConfig(0.5, 4)}


@pytest.mark.parametrize(
    "text",
    ["local", "=2", "local=", "local=0", "local=-1", "local=fast", "local=2:0", "local=2:1.5",
     "local=inf", "local=2,", "my api=2"],
)  # fmt: skip
def test_malformed_rate_limits_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        rate_limits(text)


def test_repeated_rate_limit_flags_add_up_and_the_last_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIATAG_RATE_LIMITS", "vision=1")
    settings = settings_for("--rate-limit local=2 --rate-limit vision=3:2,local=5")
    assert both(settings)[1].rate_limits == {
        "local": RateLimitConfig(5.0, 1),
        "vision": RateLimitConfig(3.0, 2),
    }


def test_rate_limits_come_from_the_environment_as_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert both(settings_for())[1].rate_limits == {}
    monkeypatch.setenv("MEDIATAG_RATE_LIMITS", "local=2:1,vision=30")
    assert both(settings_for())[1].rate_limits == {
        "local": RateLimitConfig(2.0, 1),
        "vision": RateLimitConfig(30.0, 1),
    }


def test_a_bad_rate_limit_flag_exits_with_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["serve", "--rate-limit", "local=2:0"])
    assert exit_info.value.code == 2
    assert "--rate-limit" in capsys.readouterr().err


def test_a_rate_limit_for_an_api_no_analyser_calls_is_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"rate limit for vison .*no analyser calls an API"):
        AnalysisConfig(rate_limits={"vison": RateLimitConfig(30.0)})
    result = run_cli(
        "serve", "analysis", "--data-dir", str(tmp_path), "--analysis-port", str(free_port()),
        "--analysis-metrics-port", "off", "--rate-limit", "vison=30",
    )  # fmt: skip
    assert result.returncode == 2
    assert "rate limit for vison (--rate-limit, MEDIATAG_RATE_LIMITS)" in result.stderr
    assert "Traceback" not in result.stderr
    # Refused by the config: no database was made, no migration run.
    assert list(tmp_path.iterdir()) == []


def test_the_rate_limits_of_apis_the_analyser_does_not_call_are_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # One environment file for replicas of both analysers: each takes its own limits.
    monkeypatch.setenv("MEDIATAG_RATE_LIMITS", "local=5:2,vision=30")
    port = free_port()
    serve = Serve(
        tmp_path / "serve.log", "analysis", "--data-dir", str(tmp_path),
        "--analysis-port", str(port), "--analysis-metrics-port", "off",
    ).start(port)  # fmt: skip
    try:
        queue = run_json("queue", "--analysis", f"127.0.0.1:{port}")
    finally:
        assert serve.stop() == 0
    assert [(r["api"], r["ratePerSecond"], r["burst"]) for r in queue["rateLimits"]] == [
        ("local", 5.0, 2)
    ]
    assert "ignoring the rate limit of vision: this analyser, as configured, calls only local" in (
        serve.output()
    )


async def test_the_config_names_the_apis_each_analyser_calls() -> None:
    local = AnalysisConfig(embedding_dimensions=64, analyzer_processes=0)
    google = AnalysisConfig(
        analyzer="google",
        google=GoogleConfig(
            project="p",
            insecure=True,
            vision_endpoint="127.0.0.1:1",
            vertex_endpoint="127.0.0.1:2",
        ),
    )
    refining = replace(google, google=replace(google.google, refine_tags=True))
    # Gemini is called only to refine tags.
    expected = [("local",), ("vision", "embeddings"), ("vision", "embeddings", "gemini")]
    for config, apis in zip((local, google, refining), expected, strict=True):
        if config.analyzer == "google":
            skip_without_google_extra()
        analyzer = build_analyzer(config)
        try:
            assert {limit.api for limit in analyzer.api_limits} == set(apis)
            assert set(apis) <= set(ANALYZER_APIS[config.analyzer])
        finally:
            await close_analyzer(analyzer)
    assert set(ANALYZER_APIS["google"]) == set(expected[2])


# ---- mapping onto the services' configs ----


def test_each_service_gets_its_own_directory_under_the_data_dir() -> None:
    ingest, analysis = both(settings_for("--data-dir /srv/mediatag"))
    assert ingest.data_dir == Path("/srv/mediatag/ingest")
    assert analysis.data_dir == Path("/srv/mediatag/analysis")
    assert ingest.resolved_database_url.endswith("/srv/mediatag/ingest/ingest.db")
    assert analysis.resolved_database_url.endswith("/srv/mediatag/analysis/analysis.db")


def test_the_services_find_each_other_on_the_host_and_ports_by_default() -> None:
    ingest, analysis = both(settings_for("--ingest-port 6001 --analysis-port 6002"))
    assert (ingest.host, ingest.port) == ("127.0.0.1", 6001)
    assert (analysis.host, analysis.port) == ("127.0.0.1", 6002)
    assert ingest.analysis_address == "127.0.0.1:6002"
    assert analysis.ingest_address == "127.0.0.1:6001"


def test_a_wildcard_bind_host_is_reached_over_loopback() -> None:
    ingest, analysis = both(settings_for("--host 0.0.0.0 --insecure"))
    assert ingest.host == "0.0.0.0"
    assert ingest.analysis_address == "127.0.0.1:50052"
    assert analysis.ingest_address == "127.0.0.1:50051"
    ingest, _ = both(settings_for("--host :: --insecure"))
    assert ingest.analysis_address == "[::1]:50052"


def test_explicit_addresses_and_database_urls_are_passed_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIATAG_INGEST_ADDRESS", "ingest.internal:443")
    ingest, analysis = both(
        settings_for(
            "--analysis-address analysis.internal:443 "
            "--ingest-database-url postgresql+asyncpg://db/ingest "
            "--analysis-database-url postgresql+asyncpg://db/analysis"
        )
    )
    assert ingest.analysis_address == "analysis.internal:443"
    assert analysis.ingest_address == "ingest.internal:443"
    assert ingest.resolved_database_url == "postgresql+asyncpg://db/ingest"
    assert analysis.resolved_database_url == "postgresql+asyncpg://db/analysis"


def test_a_port_of_zero_needs_the_peer_address_to_be_given() -> None:
    with pytest.raises(SettingsError, match="--analysis-address"):
        settings_for("--analysis-port 0")
    settings = settings_for("analysis --analysis-port 0")
    assert settings.analysis is not None
    assert settings.analysis.port == 0
    ingest, analysis = both(
        settings_for(
            "--ingest-port 0 --analysis-port 0 --ingest-address 127.0.0.1:7001 "
            "--analysis-address 127.0.0.1:7002"
        )
    )
    assert (ingest.port, analysis.port) == (0, 0)


def test_every_service_setting_reaches_its_config() -> None:
    ingest, analysis = both(
        settings_for(
            "--analyzer local --embedding-dimensions 64 --workers 2 --max-attempts 5 "
            "--backoff-base 0.25 --lease-seconds 12 --bookmark-interval 3 --max-watchers 50 "
            "--grace-period 4 --sqlite-synchronous normal --max-files 8 "
            "--max-image-bytes 1MiB --max-image-pixels 1000000 --max-video-bytes 64m"
        )
    )
    assert (analysis.analyzer, analysis.embedding_dimensions, analysis.workers) == ("local", 64, 2)
    assert (analysis.retry.max_attempts, analysis.retry.backoff_base) == (5, 0.25)
    assert analysis.lease_seconds == 12.0
    assert (analysis.watch.bookmark_interval, analysis.watch.max_watchers) == (3.0, 50)
    assert ingest.grace_period == analysis.grace_period == 4.0
    assert ingest.sqlite_synchronous == analysis.sqlite_synchronous == "NORMAL"
    assert ingest.limits.max_files == 8
    assert ingest.limits.max_image_bytes == MIB
    assert ingest.limits.max_image_pixels == 1_000_000
    assert ingest.limits.max_video_bytes == 64 * MIB


def test_a_database_url_that_cannot_be_used_is_refused_without_echoing_it() -> None:
    with pytest.raises(SettingsError, match=r"analysis database URL cannot be used: .*'mysql'"):
        settings_for("analysis --analysis-database-url mysql://u@db/mediatag")
    with pytest.raises(SettingsError, match="analysis database URL cannot be used: not a database"):
        settings_for("analysis --analysis-database-url no-scheme-at-all")
    with pytest.raises(SettingsError, match="ingest database URL") as refused:
        settings_for("ingest --ingest-database-url postgresql://u:secret@db:port/mediatag")
    assert "secret" not in str(refused.value)
    # libpq's own parameters say which hosts; the host part may not say others.
    with pytest.raises(ValueError, match="hosts in the URL's host part or in its parameters"):
        IngestConfig(database_url="postgresql://u@db1,db2/mediatag?host=db3")


def test_connections_are_bounded_by_the_flag_or_by_the_open_file_limit() -> None:
    ingest, analysis = both(settings_for("--max-connections 40"))
    assert ingest.server_limits.max_connections == 40
    assert analysis.server_limits.max_connections == 40
    with pytest.raises(ValueError, match="max_connections"):
        IngestConfig(max_connections=0)
    ingest, analysis = both(settings_for("--max-calls 5000"))
    assert ingest.server_limits.max_calls == analysis.server_limits.max_calls == 5000
    # Every watch stream is a call: the watchers must fit.
    with pytest.raises(SettingsError, match=r"max_watchers \(1000\) must be below max_calls"):
        settings_for("--max-calls 1000")
    web = settings_for("--web-max-connections 70").web
    assert web is not None
    assert web.connection_bound == 70
    # Without the flag: 1000 for each service, or a quarter of the open-file limit if less.
    # The web gateway's: its event streams and 1000 more, or that quarter.
    bounds = (
        "from mediatag_common.service_config import default_max_connections as d\n"
        "from web_gateway.config import WebConfig\n"
        "print(d(), WebConfig().connection_bound)"
    )
    for limit, expected in (("400", "100 100"), ("8000", "1000 2000"), ("20000", "1000 5000")):
        shown = subprocess.run(
            ["prlimit", f"--nofile={limit}:{limit}", sys.executable, "-c", bounds],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert shown.stdout.strip() == expected


def test_the_stream_window_is_an_http2_window_for_both_services() -> None:
    ingest, analysis = both(settings_for("--stream-window 1MiB"))
    assert ingest.request_limits.stream_window == analysis.request_limits.stream_window == MIB
    assert both(settings_for())[0].request_limits.stream_window == 64 * 1024
    for too_small_or_large in ("1KiB", "2GiB"):
        with pytest.raises(SettingsError, match="stream_window must be between 64KiB"):
            settings_for(f"--stream-window {too_small_or_large}")


def test_the_calls_waiting_for_room_hold_at_most_64_mib_of_windows_by_default() -> None:
    # Each may have sent a stream window of its body: 1000 of 64 KiB, 64 of 1 MiB.
    for flags, waiting, per_caller in (
        ("", 1000, None),
        ("--stream-window 1MiB", 64, None),
        ("--stream-window 256KiB", 256, None),
        ("--stream-window 1MiB --max-waiting-requests 500", 500, None),
        ("--max-waiting-requests-per-caller 30", 1000, 30),
    ):
        ingest, analysis = both(settings_for(flags))
        for config in (ingest, analysis):
            limits = config.request_limits
            assert (limits.max_waiting, limits.max_waiting_per_caller) == (waiting, per_caller)
    for setting in ("--max-waiting-requests", "--max-waiting-requests-per-caller"):
        with pytest.raises(SystemExit):
            settings_for(f"{setting} 0")
    with pytest.raises(ValueError, match="max_waiting_requests_per_caller"):
        IngestConfig(max_waiting_requests_per_caller=0)


def test_metrics_ports_are_on_by_default_and_can_be_turned_off_or_picked_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest, analysis = both(settings_for())
    assert (ingest.metrics_port, analysis.metrics_port) == (9451, 9452)

    ingest, analysis = both(settings_for("--ingest-metrics-port OFF --analysis-metrics-port 0"))
    assert (ingest.metrics_port, analysis.metrics_port) == (None, 0)

    monkeypatch.setenv("MEDIATAG_INGEST_METRICS_PORT", "off")
    monkeypatch.setenv("MEDIATAG_ANALYSIS_METRICS_PORT", "9100")
    ingest, analysis = both(settings_for())
    assert (ingest.metrics_port, analysis.metrics_port) == (None, 9100)
    # A flag turns back on what the environment turned off.
    ingest, _ = both(settings_for("--ingest-metrics-port 9200"))
    assert ingest.metrics_port == 9200


def test_a_bad_metrics_port_in_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIATAG_ANALYSIS_METRICS_PORT", "disabled")
    with pytest.raises(SettingsError, match="MEDIATAG_ANALYSIS_METRICS_PORT"):
        settings_for()
    # Only the service that reads it is stopped by it.
    assert settings_for("ingest").ingest is not None


def test_serving_one_service_builds_only_its_config() -> None:
    settings = settings_for("ingest --ingest-port 7001")
    assert settings.analysis is None
    assert settings.ingest is not None
    assert settings.ingest.port == 7001


@pytest.mark.parametrize(
    ("text", "size"), [("1024", 1024), ("20MiB", 20 * MIB), ("512m", 512 * MIB), ("2G", 2 << 30)]
)
def test_sizes_take_binary_units(text: str, size: int) -> None:
    assert byte_size(text) == size


@pytest.mark.parametrize("service", SERVICES)
def test_a_flag_wins_over_a_variable_of_the_other_form_of_its_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, service: str
) -> None:
    from_file, from_flag = "token-from-the-file-0123456789", "token-from-the-flag-0123456789"
    token_file = tmp_path / "service.token"
    token_file.write_text(from_file + "\n")

    def service_token(command_line: str) -> object:
        return getattr(settings_for(f"{service} {command_line}"), service).service_token

    # Say a systemd environment file sets one form, and the command line the other.
    monkeypatch.setenv("MEDIATAG_SERVICE_TOKEN", "token-from-the-environment-0123")
    assert service_token(f"--service-token-file {token_file}") == from_file
    monkeypatch.delenv("MEDIATAG_SERVICE_TOKEN")
    monkeypatch.setenv("MEDIATAG_SERVICE_TOKEN_FILE", str(token_file))
    assert service_token(f"--service-token {from_flag}") == from_flag
    # Given the same way, the two forms of one setting are still refused.
    with pytest.raises(SettingsError, match="give --service-token or --service-token-file, not"):
        service_token(f"--service-token {from_flag} --service-token-file {token_file}")
    monkeypatch.setenv("MEDIATAG_SERVICE_TOKEN", "token-from-the-environment-0123")
    with pytest.raises(
        SettingsError, match="set MEDIATAG_SERVICE_TOKEN or MEDIATAG_SERVICE_TOKEN_FILE, not both"
    ):
        service_token("")


def test_a_webhooks_file_refused_at_start_is_reported_without_a_traceback(
    tmp_path: Path,
) -> None:
    refused = tmp_path / "webhooks.toml"
    refused.write_text('[[endpoints]]\nname = "b"\nurl = "ftp://x"\nsecret = "whsec_abc"\n')
    for webhooks_file, problem in (
        (refused, "endpoints[0] (b): url must be http:// or https://"),
        (tmp_path / "missing.toml", "No such file or directory"),
    ):
        result = run_cli(
            "serve", "ingest", "--data-dir", str(tmp_path), "--ingest-port", str(free_port()),
            "--ingest-metrics-port", "off", "--webhooks-file", str(webhooks_file),
        )  # fmt: skip
        output = result.stdout + result.stderr
        assert result.returncode == 1, output
        assert f"cannot start: webhooks file {webhooks_file}: {problem}" in output
        assert "Traceback" not in output


def test_watch_since_a_revision_with_the_initial_state_is_a_usage_error() -> None:
    # Refused before it connects: nothing listens at port 1.
    result = run_cli("watch", "--since", "5", "--initial", "--analysis", "127.0.0.1:1")
    assert result.returncode == 2
    assert "error: --since and --initial do not go together" in result.stderr


def test_client_addresses_come_from_flags_then_environment_then_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    defaults = client_settings(parse(["queue"]))
    assert (defaults.ingest_address, defaults.analysis_address) == (
        "127.0.0.1:50051",
        "127.0.0.1:50052",
    )
    assert not defaults.json
    monkeypatch.setenv("MEDIATAG_INGEST_ADDRESS", "ingest:1")
    monkeypatch.setenv("MEDIATAG_ANALYSIS_ADDRESS", "analysis:2")
    monkeypatch.setenv("MEDIATAG_TIMEOUT", "5")
    from_env = client_settings(parse(["queue"]))
    assert (from_env.ingest_address, from_env.analysis_address, from_env.timeout) == (
        "ingest:1",
        "analysis:2",
        5.0,
    )
    from_flags = client_settings(parse(["queue", "--analysis", "other:3", "--json"]))
    assert (from_flags.ingest_address, from_flags.analysis_address) == ("ingest:1", "other:3")
    assert from_flags.json


async def test_an_unreachable_service_is_reported_plainly(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    status = await run_client(["queue", "--analysis", "127.0.0.1:1", "--timeout", "5"])
    assert status == 1
    assert "error: cannot reach the analysis service at 127.0.0.1:1" in capsys.readouterr().err


# ---- statuses ----


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("pending", ingest_pb2.PROCESSING_STATUS_PENDING),
        ("FAILED", ingest_pb2.PROCESSING_STATUS_FAILED),
        ("Completed", ingest_pb2.PROCESSING_STATUS_COMPLETED),
        ("not_applicable", ingest_pb2.PROCESSING_STATUS_NOT_APPLICABLE),
        ("not-applicable", ingest_pb2.PROCESSING_STATUS_NOT_APPLICABLE),
        ("PROCESSING_STATUS_PROCESSING", ingest_pb2.PROCESSING_STATUS_PROCESSING),
    ],
)
def test_statuses_are_named_case_insensitively(text: str, status: int) -> None:
    assert parse_status(text) == status


@pytest.mark.parametrize("text", ["", "unspecified", "done", "PROCESSING_STATUS_UNSPECIFIED"])
def test_unknown_statuses_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="pending, processing"):
        parse_status(text)


def test_status_names_round_trip() -> None:
    for name in ("pending", "processing", "completed", "failed", "not_applicable"):
        assert status_name(parse_status(name)) == name


def test_ls_takes_a_status_filter() -> None:
    args = parse(["ls", "--owner", "o", "--status", "Failed"])
    assert args.status == ingest_pb2.PROCESSING_STATUS_FAILED


# ---- logs ----


def _record(**extra: Any) -> logging.LogRecord:
    logger = logging.getLogger("analysis_service.workers")
    return logger.makeRecord(
        logger.name, logging.INFO, __file__, 1, "completed %s", ("m1",), None, extra=extra
    )


def test_json_logs_are_one_object_per_line_with_the_extra_fields() -> None:
    line = JsonFormatter().format(_record(media_id="m1", attempt=2, duration_ms=41.5))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "analysis_service.workers"
    assert entry["message"] == "completed m1"
    assert (entry["media_id"], entry["attempt"], entry["duration_ms"]) == ("m1", 2, 41.5)
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None


def test_logs_never_carry_content_bytes_or_tokens() -> None:
    record = _record(content=b"\x89PNG" * 100, bearer_token="s3cret", authorization="Bearer x")
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        assert "PNG" not in line
        assert "s3cret" not in line
        assert "Bearer x" not in line
    entry = json.loads(JsonFormatter().format(record))
    assert entry["content"] == "<400 bytes>"


def _fail() -> None:
    raise ValueError("broken")


def test_json_logs_carry_the_traceback_of_an_exception() -> None:
    try:
        _fail()
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert "ValueError: broken" in entry["exception"]


def test_text_logs_are_short_and_readable() -> None:
    line = TextFormatter().format(_record(media_id="m1", tags=["a", "b"]))
    clock, level, logger, rest = line.split(maxsplit=3)
    assert datetime.strptime(clock, "%H:%M:%S")
    assert (level, logger) == ("INFO", "analysis.workers")
    assert rest == "completed m1 media_id=m1 tags=a,b"
