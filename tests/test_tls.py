"""TLS for clients and mutual TLS between the services (SPEC §8), with a CA made here."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio
from mediatag.ingest.v1 import ingest_pb2 as ipb
from mediatag.ingest.v1 import ingest_pb2_grpc

from analysis_service.config import AnalysisConfig, RateLimitConfig
from ingest_service.config import IngestConfig
from mediatag_cli.main import parse, run_client
from mediatag_cli.settings import SettingsError, client_settings, serve_settings
from mediatag_common.grpc_server import bind, health_check_stub, open_channel
from mediatag_common.tls import ClientTls, ServerTls, ServiceTls, TlsFileError
from tests import media_samples as samples
from tests.conftest import PATIENCE, Cluster, free_port, wait_until
from tests.fakes import ScriptedAnalyzer
from tests.processes import MEDIATAG, Serve
from tests.test_auth import TOKENS, tokens_file
from tests.tls_support import Pki, make_pki, make_self_signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def mutual(pki: Pki) -> ServiceTls:
    """What each service serves with, and how it reaches the other: the README's set-up."""
    return ServiceTls(pki.server.cert, pki.server.key, client_ca_file=pki.ca, peer_ca_file=pki.ca)


@pytest.fixture
async def mtls_cluster(make_cluster: Callable[..., Cluster], pki: Pki) -> Cluster:
    tls_files = mutual(pki)
    cluster = make_cluster(
        analyzer=ScriptedAnalyzer(),
        analysis_config=AnalysisConfig(
            rate_limits={"local": RateLimitConfig(100, 10)}, tls_files=tls_files
        ),
        ingest_config=IngestConfig(tls_files=tls_files),
    )
    await cluster.start_analysis()
    await cluster.start_ingest()
    return cluster


@pytest.fixture
async def channels() -> AsyncIterator[Callable[..., grpc.aio.Channel]]:
    opened: list[grpc.aio.Channel] = []

    def make(port: int, tls: ClientTls | None, token: str | None = None) -> grpc.aio.Channel:
        channel = open_channel(f"127.0.0.1:{port}", tls=tls, token=token)
        opened.append(channel)
        return channel

    yield make
    for channel in opened:
        await channel.close()


async def list_call(channel: grpc.aio.Channel) -> ipb.ListMediaResponse:
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    return await stub.ListMedia(ipb.ListMediaRequest(owner_id="listing-1"), timeout=PATIENCE)


async def test_the_services_reach_each_other_over_mutual_tls(
    mtls_cluster: Cluster, pki: Pki, channels: Callable[..., grpc.aio.Channel]
) -> None:
    """SubmitJobs, ReadMediaContent and the status mirror's WatchStatus all cross mTLS."""
    channel = channels(mtls_cluster.ingest_port, ClientTls(pki.ca, pki.client.cert, pki.client.key))
    ingest = ingest_pb2_grpc.IngestServiceStub(channel)
    response = await ingest.UploadMedia(
        ipb.UploadMediaRequest(
            owner_id="listing-1",
            files=[ipb.MediaFile(filename="a.jpg", content=samples.jpeg_bytes(1))],
        )
    )
    media_id = response.media[0].id

    async def completed() -> bool:
        media = (await ingest.GetMedia(ipb.GetMediaRequest(media_id=media_id))).media
        return media.status == ipb.PROCESSING_STATUS_COMPLETED

    await wait_until(completed)


async def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    mtls_cluster: Cluster, pki: Pki, channels: Callable[..., grpc.aio.Channel]
) -> None:
    port = mtls_cluster.ingest_port
    refused: dict[str, ClientTls | None] = {
        "plaintext": None,
        "no client certificate": ClientTls(pki.ca),
        "a certificate of another CA": ClientTls(pki.ca, pki.stranger.cert, pki.stranger.key),
        # The client does not trust the server's CA: it refuses the server.
        "an untrusted server": ClientTls(pki.other_ca, pki.client.cert, pki.client.key),
    }
    for case, tls in refused.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_call(channels(port, tls))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, case
    # Health is open to every authenticated *connection*, but the connection is still mTLS.
    good = channels(port, ClientTls(pki.ca, pki.client.cert, pki.client.key))
    assert list((await list_call(good)).media) == []
    health = await health_check_stub(good)(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_without_client_certificates_and_with_tokens(
    make_cluster: Callable[..., Cluster],
    pki: Pki,
    tmp_path: Path,
    channels: Callable[..., grpc.aio.Channel],
) -> None:
    """Server-only TLS: any client that trusts the CA connects; tokens still decide."""
    cluster = make_cluster(
        ingest_config=IngestConfig(
            tls_files=ServiceTls(pki.server.cert, pki.server.key),
            tokens_file=tokens_file(tmp_path / "secrets"),
        )
    )
    await cluster.start_ingest()
    port = cluster.ingest_port
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_call(channels(port, None, TOKENS["admin"]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await list_call(channels(port, ClientTls(pki.ca)))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await list_call(channels(port, ClientTls(pki.ca), TOKENS["admin"]))
    assert list(ok.media) == []


async def test_the_cli_takes_tls_options_from_flags_and_environment(
    mtls_cluster: Cluster,
    pki: Pki,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("MEDIATAG_TLS_CA", "MEDIATAG_TLS_CERT", "MEDIATAG_TLS_KEY", "MEDIATAG_TLS"):
        monkeypatch.delenv(name, raising=False)
    address = ["--ingest", f"127.0.0.1:{mtls_cluster.ingest_port}"]
    assert await run_client(["ls", "--owner", "listing-1", "--tls-ca", str(pki.ca), *address]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    flags = [
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
        "--tls-key", str(pki.client.key),
    ]  # fmt: skip
    assert await run_client(["ls", "--owner", "listing-1", *flags, *address]) == 0
    assert "no media for owner listing-1" in capsys.readouterr().out
    monkeypatch.setenv("MEDIATAG_TLS_CA", str(pki.ca))
    monkeypatch.setenv("MEDIATAG_TLS_CERT", str(pki.client.cert))
    monkeypatch.setenv("MEDIATAG_TLS_KEY", str(pki.client.key))
    assert await run_client(["ls", "--owner", "listing-1", *address]) == 0
    assert "no media for owner listing-1" in capsys.readouterr().out


def test_tls_settings_go_together() -> None:
    def serve(*argv: str) -> Any:
        return serve_settings(parse(["serve", *argv]), ("ingest", "analysis"), {})

    with pytest.raises(SettingsError, match="--tls-cert and --tls-key"):
        serve("--tls-cert", "c.pem")
    with pytest.raises(SettingsError, match="--tls-client-ca needs"):
        serve("--tls-client-ca", "ca.pem")
    settings = serve(
        "--tls-cert", "s.pem", "--tls-key", "s.key", "--tls-client-ca", "ca.pem",
        "--tls-ca", "ca.pem",
    )  # fmt: skip
    assert settings.ingest.tls == ServerTls(Path("s.pem"), Path("s.key"), Path("ca.pem"))
    assert settings.analysis.peer_tls == ClientTls(Path("ca.pem"), Path("s.pem"), Path("s.key"))
    assert serve().ingest.tls is None
    assert serve().ingest.peer_tls is None

    with pytest.raises(SettingsError, match="--tls-cert and --tls-key"):
        client_settings(parse(["queue", "--tls-key", "k.pem"]), {})
    assert client_settings(parse(["queue"]), {}).tls is None
    assert client_settings(parse(["queue", "--tls"]), {}).tls == ClientTls()
    from_env = client_settings(parse(["queue"]), {"MEDIATAG_TLS_CA": "ca.pem"})
    assert from_env.tls == ClientTls(Path("ca.pem"))


@pytest.mark.e2e
async def test_the_readme_secured_setup_runs(pki: Pki, tmp_path: Path) -> None:
    """``mediatag serve`` with a tokens file and mutual TLS, then ``upload --watch``."""
    secrets = tmp_path / "secrets"
    tokens = tokens_file(secrets)
    (secrets / "service.token").write_text(TOKENS["service"] + "\n")
    ingest_port, analysis_port = free_port(), free_port()
    serve = Serve(
        tmp_path / "serve.log",
        "--data-dir", str(tmp_path / "data"),
        "--ingest-port", str(ingest_port), "--analysis-port", str(analysis_port),
        "--tokens-file", str(tokens), "--service-token-file", str(secrets / "service.token"),
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca), "--tls-ca", str(pki.ca),
        "--analyzer-processes", "0", "--rate-limit", "local=50:5",
    ).start()  # fmt: skip
    try:
        deadline = time.monotonic() + PATIENCE
        while serve.output().count("listening on") < 2:
            assert serve.process is not None
            assert serve.process.poll() is None, serve.output()
            assert time.monotonic() < deadline, serve.output()
            await asyncio.sleep(0.1)
        image = tmp_path / "a.jpg"
        image.write_bytes(samples.jpeg_bytes(5))
        env = {
            **os.environ,
            "MEDIATAG_INGEST_ADDRESS": f"localhost:{ingest_port}",
            "MEDIATAG_ANALYSIS_ADDRESS": f"localhost:{analysis_port}",
            "MEDIATAG_TOKEN": TOKENS["uploader7"],
            "MEDIATAG_TLS_CA": str(pki.ca),
            "MEDIATAG_TLS_CERT": str(pki.client.cert),
            "MEDIATAG_TLS_KEY": str(pki.client.key),
        }
        upload = await asyncio.create_subprocess_exec(
            MEDIATAG, "upload", str(image), "--owner", "listing-7", "--watch",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(upload.communicate(), PATIENCE)
        assert upload.returncode == 0, (out, err, serve.output())
        assert b"1/1 done: 1 completed" in out
        other = await asyncio.create_subprocess_exec(
            MEDIATAG, "ls", "--owner", "listing-8", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(other.communicate(), PATIENCE)
        assert other.returncode == 1
        assert b"PERMISSION_DENIED OWNER_NOT_ALLOWED" in err
    finally:
        assert serve.stop() == 0, serve.output()
    for token in TOKENS.values():
        assert token not in serve.output()


@pytest.fixture(scope="module")
def bad_files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A file that is no certificate, an expired certificate, one that expires in a day."""
    directory = tmp_path_factory.mktemp("bad-tls")
    garbage = directory / "garbage.pem"
    garbage.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    expired = make_self_signed(directory, "expired", now - 30 * day, now - day)
    soon = make_self_signed(directory, "soon", now - day, now + day)
    return {
        "garbage": garbage,
        "expired": expired.cert,
        "expired.key": expired.key,
        "soon": soon.cert,
        "soon.key": soon.key,
    }


@pytest.mark.parametrize(
    "serve",
    [
        ["ingest", "--ingest-port", "0", "--ingest-metrics-port", "off"],
        # The gateway serves through ssl, which names no file; its channels to the services
        # check the same certificate first.
        ["web", "--web-port", "0", "--ingest-address", "127.0.0.1:1",
         "--analysis-address", "127.0.0.1:1"],
    ],
    ids=["grpc", "web"],
)  # fmt: skip
def test_a_tls_file_that_cannot_serve_stops_the_start_naming_it(
    pki: Pki, bad_files: dict[str, Path], tmp_path: Path, serve: list[str]
) -> None:
    """Not "Failed to bind to address", which reads as a taken port: the file and what is
    wrong with it, without a traceback."""
    result = subprocess.run(
        [
            MEDIATAG, "serve", *serve, "--data-dir", str(tmp_path / "data"),
            "--tls-cert", str(bad_files["garbage"]), "--tls-key", str(pki.server.key),
        ],
        capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"cannot start: {bad_files['garbage']}: no PEM certificate in it" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Failed to bind" not in result.stderr


def test_tls_files_are_checked_before_grpc_takes_them(pki: Pki, bad_files: dict[str, Path]) -> None:
    refusals: list[tuple[Callable[[], object], str]] = [
        (
            ServerTls(bad_files["garbage"], pki.server.key).credentials,
            f"{bad_files['garbage']}: no PEM certificate in it",
        ),
        (
            ServerTls(bad_files["expired"], bad_files["expired.key"]).credentials,
            f"{bad_files['expired']}: the certificate CN=expired expired on ",
        ),
        (
            ServerTls(pki.server.cert, pki.client.key).credentials,
            f"{pki.client.key}: not the private key of the certificate in {pki.server.cert}",
        ),
        (
            ServerTls(pki.server.cert, bad_files["garbage"]).credentials,
            f"{bad_files['garbage']}: no PEM private key in it",
        ),
        (
            ServerTls(pki.server.cert, pki.server.key, bad_files["garbage"]).credentials,
            f"{bad_files['garbage']}: no PEM certificate in it",
        ),
        (
            ServerTls(pki.server.cert, pki.server.key, pki.ca.with_name("absent.pem")).credentials,
            f"{pki.ca.with_name('absent.pem')}: No such file or directory",
        ),
        (
            ClientTls(bad_files["garbage"]).credentials,
            f"{bad_files['garbage']}: no PEM certificate in it",
        ),
        (
            ClientTls(pki.ca, bad_files["expired"], bad_files["expired.key"]).credentials,
            f"{bad_files['expired']}: the certificate CN=expired expired on ",
        ),
        (
            ClientTls(pki.ca, pki.client.cert, pki.server.key).credentials,
            f"{pki.server.key}: not the private key of the certificate in {pki.client.cert}",
        ),
    ]
    for credentials, message in refusals:
        with pytest.raises(TlsFileError) as refused:
            credentials()
        assert str(refused.value).startswith(message)
    assert ServerTls(pki.server.cert, pki.server.key, pki.ca).credentials() is not None
    assert ClientTls(pki.ca, pki.client.cert, pki.client.key).credentials() is not None


def test_a_client_command_given_a_bad_tls_file_is_a_usage_error(
    pki: Pki, bad_files: dict[str, Path]
) -> None:
    # Checked before the first call: no traceback from the channel that would open it.
    result = subprocess.run(
        [
            MEDIATAG, "queue", "--analysis", "127.0.0.1:1",
            "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert),
            "--tls-key", str(bad_files["garbage"]),
        ],
        capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"{bad_files['garbage']}: no PEM private key in it" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_certificate_that_expires_soon_serves_with_a_warning(
    bad_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="mediatag_common.tls")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(aio.HealthServicer(), server)
    port = bind(server, "127.0.0.1:0", ServerTls(bad_files["soon"], bad_files["soon.key"]))
    warnings = [r.getMessage() for r in caplog.records if r.name == "mediatag_common.tls"]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{bad_files['soon']}: the certificate CN=soon expires on ")
    await server.start()
    try:
        channel = open_channel(f"127.0.0.1:{port}", tls=ClientTls(bad_files["soon"]))
        answer = await health_check_stub(channel)(health_pb2.HealthCheckRequest(), timeout=PATIENCE)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        await channel.close()
    finally:
        await server.stop(None)
