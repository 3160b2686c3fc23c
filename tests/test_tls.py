"""Server TLS on real loopback sockets: version floors, old-client ciphers, live reload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import smtplib
import ssl
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP as AioSMTP

from gateway.smtp.tls import ReloadableTLS, cert_fingerprint, make_server_context

from .helpers.tls import make_cert

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed to make test certificates")

CLIENT_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
HANDSHAKE_FAILED = (ssl.SSLError, ConnectionError)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_cert(directory, name, f"{name}.faxgw.test") for name in ("a", "b")}


@pytest.fixture
def live_pair(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[tuple[Path, Path]]:
    """The paths a daemon would be configured with, holding certificate "a" for now."""
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    shutil.copy(certs["a"][0], cert)
    shutil.copy(certs["a"][1], key)
    yield cert, key


def _install(src: tuple[Path, Path], dst: tuple[Path, Path]) -> None:
    """Replace the live files the way an ACME client does: write aside, rename over."""
    for s, d in zip(src, dst, strict=True):
        tmp = d.with_suffix(".new")
        shutil.copy(s, tmp)
        os.replace(tmp, d)


def client_context(version: str | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    """A client that accepts any certificate, optionally pinned to exactly one version (and
    security level 0, as an old scanner's stack effectively is)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = CLIENT_VERSIONS[version]
        ctx.set_ciphers(ciphers or "DEFAULT:@SECLEVEL=0")
    elif ciphers:
        ctx.set_ciphers(ciphers)
    return ctx


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
            await reader.read(100)  # until the client closes
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(port: int, client: ssl.SSLContext,
                    server_hostname: str | None = None) -> tuple[str, str, str]:
    """(TLS version, cipher, SHA-256 of the server certificate) of one fresh connection."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=client,
                                server_hostname=server_hostname or ""), 10)
    try:
        assert await asyncio.wait_for(reader.readline(), 10) == b"hello\n"
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        return ssl_object.version(), ssl_object.cipher()[0], hashlib.sha256(der).hexdigest()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


# -- version floors -------------------------------------------------------------------


@pytest.mark.parametrize(("min_version", "accepted", "refused"), [
    ("TLSv1.2", ["TLSv1.2", "TLSv1.3"], ["TLSv1", "TLSv1.1"]),  # the default
    ("TLSv1", ["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"], []),
    ("TLSv1.1", ["TLSv1.1", "TLSv1.2", "TLSv1.3"], ["TLSv1"]),
    ("TLSv1.3", ["TLSv1.3"], ["TLSv1", "TLSv1.1", "TLSv1.2"]),
])
async def test_version_floor(certs: dict[str, tuple[Path, Path]], min_version: str,
                             accepted: list[str], refused: list[str]) -> None:
    ctx = make_server_context(*certs["a"], min_version=min_version)
    async with tls_server(ctx) as port:
        for version in accepted:
            got, _, fingerprint = await handshake(port, client_context(version))
            assert got == version
            assert fingerprint == cert_fingerprint(certs["a"][0])
        for version in refused:
            with pytest.raises(HANDSHAKE_FAILED):
                await handshake(port, client_context(version))


async def test_default_is_tls12(certs: dict[str, tuple[Path, Path]]) -> None:
    ctx = make_server_context(*certs["a"])
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    async with tls_server(ctx) as port:
        with pytest.raises(HANDSHAKE_FAILED):
            await handshake(port, client_context("TLSv1"))
        version, _, _ = await handshake(port, client_context())
        assert version == "TLSv1.3"


@pytest.mark.parametrize("cipher", ["ECDHE-RSA-AES128-SHA", "AES128-SHA"])
async def test_tls12_scanner_with_only_cbc_sha_suites(certs: dict[str, tuple[Path, Path]],
                                                      cipher: str) -> None:
    """Python's own default list would refuse these; many TLS 1.2 MFPs offer nothing else."""
    async with tls_server(make_server_context(*certs["a"])) as port:
        version, negotiated, _ = await handshake(port, client_context("TLSv1.2", cipher))
        assert (version, negotiated) == ("TLSv1.2", cipher)


async def test_tls10_scanner_with_rsa_key_exchange(certs: dict[str, tuple[Path, Path]]) -> None:
    ctx = make_server_context(*certs["a"], min_version="TLSv1")
    async with tls_server(ctx) as port:
        version, cipher, _ = await handshake(port, client_context("TLSv1",
                                                                  "AES128-SHA:@SECLEVEL=0"))
        assert (version, cipher) == ("TLSv1", "AES128-SHA")


def test_bad_settings(certs: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'SSLv3' is not one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3"):
        make_server_context(*certs["a"], min_version="SSLv3")
    with pytest.raises(ssl.SSLError):
        make_server_context(certs["a"][0], certs["b"][1])  # key of another certificate
    with pytest.raises(OSError):
        make_server_context(tmp_path / "missing.crt", certs["a"][1])
    with pytest.raises(ValueError, match="no PEM certificate"):
        cert_fingerprint(certs["a"][1])


def test_fingerprint_matches_openssl(certs: dict[str, tuple[Path, Path]]) -> None:
    out = subprocess.run(["openssl", "x509", "-in", str(certs["a"][0]), "-noout", "-fingerprint",
                          "-sha256"], check=True, capture_output=True, text=True).stdout
    assert cert_fingerprint(certs["a"][0]) == out.strip().split("=", 1)[1].replace(":", "").lower()


# -- live reload ----------------------------------------------------------------------


@pytest.mark.parametrize("server_hostname", [None, "faxgw.test"])  # scanners often send no SNI
async def test_reload_serves_new_certificate_to_new_connections(
        certs: dict[str, tuple[Path, Path]], live_pair: tuple[Path, Path],
        server_hostname: str | None) -> None:
    fp_a, fp_b = cert_fingerprint(certs["a"][0]), cert_fingerprint(certs["b"][0])
    tls = ReloadableTLS(*live_pair)
    front = tls.context
    assert tls.fingerprint == fp_a
    async with tls_server(tls.context) as port:
        assert (await handshake(port, client_context(), server_hostname))[2] == fp_a
        # A connection that stays open across the reload keeps its certificate.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname=server_hostname or "")
        await reader.readline()

        _install(certs["b"], live_pair)
        assert (await handshake(port, client_context(), server_hostname))[2] == fp_a  # not yet
        assert tls.reload() == fp_b
        assert tls.context is front  # the listener's object never changes
        for _ in range(3):
            assert (await handshake(port, client_context(), server_hostname))[2] == fp_b

        old_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert hashlib.sha256(old_der).hexdigest() == fp_a
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_reload_if_changed(certs: dict[str, tuple[Path, Path]],
                                 live_pair: tuple[Path, Path]) -> None:
    tls = ReloadableTLS(*live_pair)
    assert tls.reload_if_changed() is False
    _install(certs["b"], live_pair)
    assert tls.reload_if_changed() is True
    assert tls.fingerprint == cert_fingerprint(certs["b"][0])
    assert tls.reload_if_changed() is False
    # Rewritten in place with the same bytes: no reload; with other bytes: reload.
    live_pair[0].write_bytes(certs["b"][0].read_bytes())
    assert tls.reload_if_changed() is False
    live_pair[0].write_bytes(certs["a"][0].read_bytes())
    live_pair[1].write_bytes(certs["a"][1].read_bytes())
    assert tls.reload_if_changed() is True
    assert tls.fingerprint == cert_fingerprint(certs["a"][0])


async def test_failed_reload_keeps_serving_the_old_certificate(
        certs: dict[str, tuple[Path, Path]], live_pair: tuple[Path, Path]) -> None:
    fp_a = cert_fingerprint(certs["a"][0])
    tls = ReloadableTLS(*live_pair)
    async with tls_server(tls.context) as port:
        shutil.copy(certs["b"][0], live_pair[0])  # half-way through a renewal: new cert, old key
        with pytest.raises(ssl.SSLError):
            tls.reload()
        with pytest.raises(ssl.SSLError):
            tls.reload_if_changed()
        assert tls.fingerprint == fp_a
        assert (await handshake(port, client_context()))[2] == fp_a
        shutil.copy(certs["b"][1], live_pair[1])  # the renewal completes
        assert tls.reload_if_changed() is True
        assert (await handshake(port, client_context()))[2] == cert_fingerprint(certs["b"][0])


async def test_reload_keeps_legacy_tls10_working(certs: dict[str, tuple[Path, Path]],
                                                 live_pair: tuple[Path, Path]) -> None:
    """The swapped-in context brings its own security level; it must stay at 0 for TLS 1.0."""
    tls = ReloadableTLS(*live_pair, min_version="TLSv1")
    async with tls_server(tls.context) as port:
        assert (await handshake(port, client_context("TLSv1")))[0] == "TLSv1"
        _install(certs["b"], live_pair)
        tls.reload()
        version, _, fingerprint = await handshake(port, client_context("TLSv1"))
        assert (version, fingerprint) == ("TLSv1", cert_fingerprint(certs["b"][0]))
        assert (await handshake(port, client_context("TLSv1.1")))[0] == "TLSv1.1"


async def test_reload_keeps_the_version_floor(certs: dict[str, tuple[Path, Path]],
                                              live_pair: tuple[Path, Path]) -> None:
    tls = ReloadableTLS(*live_pair)
    async with tls_server(tls.context) as port:
        _install(certs["b"], live_pair)
        tls.reload()
        with pytest.raises(HANDSHAKE_FAILED):
            await handshake(port, client_context("TLSv1"))
        assert ((await handshake(port, client_context("TLSv1.2")))[2]
                == cert_fingerprint(certs["b"][0]))


class _NullHandler:
    pass


async def test_starttls_through_aiosmtpd_sees_reloaded_certificate(
        certs: dict[str, tuple[Path, Path]], live_pair: tuple[Path, Path]) -> None:
    tls = ReloadableTLS(*live_pair)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: AioSMTP(_NullHandler(), tls_context=tls.context, hostname="faxgw.test"),
        "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def starttls_fingerprint() -> str:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
            client.ehlo("scanner.test")
            assert client.has_extn("starttls")
            code, _ = client.starttls(context=client_context())
            assert code == 220
            assert client.sock is not None
            der = client.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
            client.ehlo("scanner.test")
            return hashlib.sha256(der).hexdigest()

    try:
        assert await asyncio.to_thread(starttls_fingerprint) == cert_fingerprint(certs["a"][0])
        _install(certs["b"], live_pair)
        tls.reload()
        assert await asyncio.to_thread(starttls_fingerprint) == cert_fingerprint(certs["b"][0])
    finally:
        server.close()
        await server.wait_closed()
