"""Settings of the ``mediatag`` command: flags, then ``MEDIATAG_*`` variables, then defaults.

The services' settings are declared on their configs (``IngestConfig``, ``AnalysisConfig``);
the command's own are declared here: how ``serve`` logs, and where the client commands connect.
``mediatag_cli.options`` turns the declarations into flags and values.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from analysis_service.config import AnalysisConfig
from ingest_service.config import IngestConfig
from mediatag_cli.options import Option, Resolver, add_option, options_of
from mediatag_cli.options import SettingsError as SettingsError
from mediatag_common.service_config import ServiceConfig
from mediatag_common.settings import setting
from mediatag_common.tls import ClientTls
from mediatag_common.values import (
    LOG_LEVELS,
    log_format,
    log_level,
    positive_float,
    secret,
    word,
)
from web_gateway.config import WebConfig

INGEST = IngestConfig.SERVICE
ANALYSIS = AnalysisConfig.SERVICE
WEB = WebConfig.SERVICE
SERVICES = (INGEST, ANALYSIS, WEB)
_SECTIONS = {WEB: "web gateway"}
_CONFIGS: dict[str, ServiceConfig | WebConfig] = {
    INGEST: IngestConfig(),
    ANALYSIS: AnalysisConfig(),
    WEB: WebConfig(),
}


@dataclass(frozen=True)
class ServeSettings:
    """What ``mediatag serve`` runs: the config of each service it starts, and how to log."""

    ingest: IngestConfig | None = None
    analysis: AnalysisConfig | None = None
    web: WebConfig | None = None
    log_level: str = setting(
        "INFO",
        flag="--log-level",
        help=f"log level: {', '.join(LOG_LEVELS)}",
        parse=log_level,
        metavar="LEVEL",
        shared=True,
    )
    log_format: str = setting(
        "text",
        flag="--log-format",
        help="text (for people) or json (one object per line)",
        parse=log_format,
        metavar="FORMAT",
        shared=True,
    )

    def __post_init__(self) -> None:
        # In one process the two services call each other (and the web gateway watches the
        # analysis service): with tokens, with a service token. The gateway's own config
        # already requires one with a tokens file.
        for caller, callee in ((self.ingest, self.analysis), (self.analysis, self.ingest)):
            if caller and callee and callee.tokens_file is not None and not caller.service_token:
                raise ValueError(
                    "with --tokens-file the two services call each other with a service token: "
                    "give --service-token-file (or MEDIATAG_SERVICE_TOKEN) with a token of role "
                    "service"
                )

    @property
    def grace_period(self) -> float:
        """How long in-flight work gets to finish on SIGTERM."""
        configs = (self.ingest, self.analysis, self.web)
        return max(config.grace_period for config in configs if config)


@dataclass(frozen=True)
class ClientSettings:
    """Where the client commands connect and how they print."""

    ingest_address: str = setting(
        "127.0.0.1:50051",
        flag="--ingest",
        help="address of the ingest service",
        parse=word,
        metavar="ADDR",
        env="MEDIATAG_INGEST_ADDRESS",
    )
    analysis_address: str = setting(
        "127.0.0.1:50052",
        flag="--analysis",
        help="address of the analysis service",
        parse=word,
        metavar="ADDR",
        env="MEDIATAG_ANALYSIS_ADDRESS",
    )
    timeout: float = setting(
        30.0,
        flag="--timeout",
        help="seconds to wait for each call (not for watch streams)",
        parse=positive_float,
        metavar="SECONDS",
    )
    token: str | None = setting(
        None,
        flag="--token",
        help="bearer token to call the services with",
        parse=secret,
        metavar="TOKEN",
        shown_default="none",
        repr=False,
    )
    use_tls: bool = setting(
        False, flag="--tls", help="connect over TLS (implied by --tls-ca and --tls-cert)"
    )
    tls_ca: Path | None = setting(
        None,
        flag="--tls-ca",
        help="CA that signed the services' certificates",
        parse=Path,
        metavar="FILE",
        shown_default="the system's roots",
    )
    tls_cert: Path | None = setting(
        None,
        flag="--tls-cert",
        help="client certificate, for services that require one",
        parse=Path,
        metavar="FILE",
        shown_default="none",
    )
    tls_key: Path | None = setting(
        None,
        flag="--tls-key",
        help="private key of --tls-cert",
        parse=Path,
        metavar="FILE",
        shown_default="none",
    )
    # Print JSON for scripts (a flag of each command, no variable).
    json: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")

    @property
    def tls(self) -> ClientTls | None:
        """How to reach the services over TLS; None: plaintext."""
        if not (self.use_tls or self.tls_ca is not None or self.tls_cert is not None):
            return None
        return ClientTls(self.tls_ca, self.tls_cert, self.tls_key)


def _serve_options(services: Sequence[str]) -> list[tuple[str, Option]]:
    """The options of ``mediatag serve`` for ``services``, each with its help section.

    A service's settings are offered when it runs, and its shared ones (the ports each
    service reaches the other on, say) always; a setting several have is offered once.
    """
    offered: dict[str, tuple[str, Option]] = {}
    for service, config in _CONFIGS.items():
        for option in options_of(config, service):
            if service not in services and not option.setting.shared:
                continue
            flag = option.setting.flag
            if flag in offered:
                offered[flag] = ("shared", offered[flag][1])
            else:
                offered[flag] = (_SECTIONS.get(service, f"{service} service"), option)
    for option in options_of(ServeSettings()):
        offered[option.setting.flag] = ("logging", option)
    return list(offered.values())


def add_serve_arguments(parser: argparse.ArgumentParser, services: Sequence[str]) -> None:
    """Add the flags of ``mediatag serve`` for ``services`` to ``parser``."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for section, option in _serve_options(services):
        if section not in sections:
            sections[section] = parser.add_argument_group(section)
        add_option(sections[section], option)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every client command shares (addresses, timeout, ``--json``)."""
    for option in options_of(ClientSettings()):
        add_option(parser, option)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def serve_settings(
    args: argparse.Namespace, services: Sequence[str], environ: Mapping[str, str] | None = None
) -> ServeSettings:
    """Resolve ``mediatag serve`` flags, environment and defaults into the services' configs.

    Only the settings of ``services`` are read, so a bad variable meant for the other service
    does not stop this one.
    """
    resolver = Resolver((option for _, option in _serve_options(services)), args, environ)
    configs = {
        service: resolver.build(config, options_of(config, service))
        for service, config in _CONFIGS.items()
        if service in services
    }
    return resolver.build(ServeSettings(), options_of(ServeSettings()), **configs)


def client_settings(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> ClientSettings:
    """Resolve the client commands' shared options."""
    options = options_of(ClientSettings())
    resolver = Resolver(options, args, environ)
    return resolver.build(ClientSettings(), options, json=bool(getattr(args, "json", False)))
