"""Proves testsupport/s3server.py gives us a real, SigV4-enforcing S3 on loopback.

Every check goes over real HTTP: boto3 for signed calls, plain urllib (no
signing, no proxies) for presigned URLs and anonymous access.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import botocore.auth
import pytest
from botocore.client import BaseClient
from botocore.exceptions import ClientError, EndpointConnectionError

from testsupport.s3server import SeaweedS3, SeaweedS3Error

BUCKET = "faxgw-test"
KEY = "outbound/2024/fax-0001.pdf"
BODY = b"%PDF-1.4\n% faxgw s3server test object\n%%EOF\n"

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, method: str = "GET", data: bytes | None = None) -> tuple[int, bytes]:
    """Plain, unsigned HTTP request -> (status, body); error statuses don't raise."""
    request = urllib.request.Request(url, method=method, data=data)
    try:
        with _DIRECT.open(request, timeout=10) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def error_code(exc: ClientError) -> tuple[int, str]:
    """(HTTP status, S3 error code) of a botocore ClientError."""
    return (
        int(exc.response["ResponseMetadata"]["HTTPStatusCode"]),
        str(exc.response["Error"]["Code"]),
    )


def presign_get(
    client: BaseClient,
    monkeypatch: pytest.MonkeyPatch,
    *,
    signed_at: dt.datetime,
    expires_in: int,
) -> str:
    """Presigned GET URL whose X-Amz-Date is ``signed_at`` (naive UTC).

    botocore.auth reads the clock through ``get_current_datetime``; pinning
    it lets us mint an already-expired URL instead of sleeping past expiry.
    """
    with monkeypatch.context() as patch:
        patch.setattr(botocore.auth, "get_current_datetime", lambda *_a, **_k: signed_at)
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=expires_in
        )
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert query["X-Amz-Date"] == [signed_at.strftime("%Y%m%dT%H%M%SZ")]
    return url


def utcnow() -> dt.datetime:
    """Naive UTC now, the form botocore.auth.get_current_datetime returns."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def with_query_param(url: str, name: str, value: str) -> str:
    """``url`` with one query parameter replaced (order and encoding kept)."""
    parts = urllib.parse.urlsplit(url)
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    assert name in dict(pairs), f"{name} not in {url}"
    query = urllib.parse.urlencode([(k, value if k == name else v) for k, v in pairs])
    return urllib.parse.urlunsplit(parts._replace(query=query))


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(hex local address, port) of every TCP socket ``pid`` is LISTENing on (Linux)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A == LISTEN
                address, port = local.rsplit(":", 1)
                found.add((address, int(port, 16)))
    return found


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """One server for the module, with BUCKET/KEY stored via a signed PUT."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        server.create_bucket(BUCKET)
        server.client().put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
        yield server


def test_server_basics(s3: SeaweedS3) -> None:
    assert s3.endpoint_url == f"http://127.0.0.1:{s3.ports['s3']}"
    assert s3.region == "us-east-1"
    assert s3.running and s3.startup_seconds is not None
    assert all(0 < port <= 65535 for port in s3.ports.values())
    assert len(set(s3.ports.values())) == len(s3.ports)
    assert s3.log_path == s3.workdir / "weed.log" and s3.log_path.stat().st_size > 0


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_listens_on_loopback_only_and_on_our_ports(s3: SeaweedS3) -> None:
    assert s3.pid is not None
    listening = listening_addresses(s3.pid)
    assert listening, "weed has no listening sockets?"
    loopback_v4 = "0100007F"  # 127.0.0.1 in /proc/net/tcp byte order
    assert {address for address, _ in listening} == {loopback_v4}, listening
    assert {port for _, port in listening} <= set(s3.ports.values())


def test_put_and_get_with_valid_credentials(s3: SeaweedS3) -> None:
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key="valid/creds.bin", Body=b"\x00\x01binary\xff")
    got = client.get_object(Bucket=BUCKET, Key="valid/creds.bin")
    assert got["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert got["Body"].read() == b"\x00\x01binary\xff"
    assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY


def test_wrong_secret_key_is_rejected(s3: SeaweedS3) -> None:
    forged = s3.client(aws_secret_access_key=s3.secret_key + "x")
    with pytest.raises(ClientError) as read_err:
        forged.get_object(Bucket=BUCKET, Key=KEY)
    assert error_code(read_err.value) == (403, "SignatureDoesNotMatch")
    with pytest.raises(ClientError) as write_err:
        forged.put_object(Bucket=BUCKET, Key="forged.pdf", Body=b"evil")
    assert error_code(write_err.value) == (403, "SignatureDoesNotMatch")
    with pytest.raises(ClientError):
        s3.client().head_object(Bucket=BUCKET, Key="forged.pdf")


def test_unknown_access_key_is_rejected(s3: SeaweedS3) -> None:
    stranger = s3.client(aws_access_key_id="AKIDONOTEXIST0000000")
    with pytest.raises(ClientError) as err:
        stranger.get_object(Bucket=BUCKET, Key=KEY)
    assert error_code(err.value) == (403, "InvalidAccessKeyId")


def test_presigned_get_works_over_plain_http(s3: SeaweedS3) -> None:
    url = s3.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=300
    )
    assert url.startswith(f"{s3.endpoint_url}/{BUCKET}/")
    assert "X-Amz-Signature=" in url and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url
    assert http(url) == (200, BODY)


def test_tampered_signature_is_rejected(s3: SeaweedS3) -> None:
    url = s3.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=300
    )
    signature = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["X-Amz-Signature"][0]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    status, body = http(with_query_param(url, "X-Amz-Signature", flipped))
    assert status == 403
    assert b"SignatureDoesNotMatch" in body


def test_tampered_expiry_and_method_are_rejected(s3: SeaweedS3) -> None:
    """X-Amz-Expires and the HTTP method are covered by the signature too."""
    url = s3.client().generate_presigned_url(
        "get_object", Params={"Bucket": BUCKET, "Key": KEY}, ExpiresIn=60
    )
    status, body = http(with_query_param(url, "X-Amz-Expires", "3600"))
    assert (status, b"SignatureDoesNotMatch" in body) == (403, True)
    status, _ = http(url, method="PUT", data=b"overwrite attempt")
    assert status == 403
    assert s3.client().get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY


def test_expired_presigned_url_is_rejected(
    s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Signed 30 s ago and valid for 1 s: expired by ~29 s when fetched. No sleep.
    url = presign_get(
        s3.client(), monkeypatch, signed_at=utcnow() - dt.timedelta(seconds=30), expires_in=1
    )
    status, body = http(url)
    assert status == 403
    assert b"Request has expired" in body, body


def test_backdated_but_unexpired_presigned_url_works(
    s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the expiry test: the same back-dating with a long expiry is
    accepted, so the 403 above is caused by expiry, not by the clock trick."""
    url = presign_get(
        s3.client(), monkeypatch, signed_at=utcnow() - dt.timedelta(seconds=30), expires_in=3600
    )
    assert http(url) == (200, BODY)


def test_anonymous_requests_are_rejected(s3: SeaweedS3) -> None:
    status, body = http(f"{s3.endpoint_url}/{BUCKET}/{KEY}")
    assert status == 403 and b"AccessDenied" in body
    assert http(f"{s3.endpoint_url}/{BUCKET}")[0] == 403  # ListObjects
    assert http(f"{s3.endpoint_url}/")[0] == 403  # ListBuckets
    status, _ = http(f"{s3.endpoint_url}/{BUCKET}/anon.pdf", method="PUT", data=b"x")
    assert status == 403
    with pytest.raises(ClientError):
        s3.client().head_object(Bucket=BUCKET, Key="anon.pdf")


def test_stop_then_restart_keeps_objects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inherited AWS creds must not become a second identity (weed mini would
    # otherwise create one from them).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIALEAKEDFROMENV000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked-secret-from-env")
    with SeaweedS3(tmp_path / "s3") as server:
        ports = dict(server.ports)
        server.create_bucket(BUCKET)
        client = server.client()
        client.put_object(Bucket=BUCKET, Key=KEY, Body=BODY)
        with pytest.raises(ClientError) as leaked:
            server.client(
                aws_access_key_id="AKIALEAKEDFROMENV000",
                aws_secret_access_key="leaked-secret-from-env",
            ).get_object(Bucket=BUCKET, Key=KEY)
        assert error_code(leaked.value)[0] == 403

        server.stop()
        assert not server.running
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", ports["s3"]), timeout=2).close()
        with pytest.raises(EndpointConnectionError):
            client.get_object(Bucket=BUCKET, Key=KEY)

        server.restart()
        assert server.running and server.ports == ports
        # The client made before the outage works again: same URL, same keys.
        assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY

        server.restart()  # restart of a running server: stop + start
        assert client.get_object(Bucket=BUCKET, Key=KEY)["Body"].read() == BODY
        pid = server.pid
    assert pid is not None and not server.running
    with pytest.raises(ProcessLookupError):  # whole process group is gone
        os.killpg(pid, 0)


def test_startup_failure_reports_log_tail(tmp_path: Path) -> None:
    """A weed that dies at once yields a clear error with command and log tail."""
    server = SeaweedS3(tmp_path / "broken", weed="/bin/false", startup_timeout=10)
    with pytest.raises(SeaweedS3Error) as err:
        server.start()
    message = str(err.value)
    assert "exited with code 1 during startup" in message
    assert "/bin/false" in message and str(server.log_path) in message
    assert not server.running
