"""The S3 media store against a real S3 server (SeaweedFS): deletes asked for together go out
together, and each caller still learns whether its own object went."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from gateway.media_store import MediaError, S3MediaStore
from testsupport.harness import free_port
from testsupport.s3server import SeaweedS3


@pytest.fixture
def s3_credentials(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)


def media_store(seaweed: SeaweedS3, prefix: str, bucket: str = "faxgw-test") -> S3MediaStore:
    return S3MediaStore(bucket=bucket, prefix=prefix, region=seaweed.region,
                        endpoint_url=seaweed.endpoint_url, timeout_s=10)


def _delete_objects_calls(store: S3MediaStore) -> list[int]:
    """Through botocore's public event hooks: the keys in each DeleteObjects call from now on."""
    calls: list[int] = []
    store._client.meta.events.register(
        "provide-client-params.s3.DeleteObjects",
        lambda params, **_: calls.append(len(params["Delete"]["Objects"])))
    return calls


async def _mail_to_three_numbers_reported(manual_gateway, seaweed: SeaweedS3, simulator,
                                          tmp_path: Path, prefix: str, series: str,
                                          **env: str) -> tuple:
    """A gateway on SeaweedFS (objects under `prefix`), one mail to three numbers, driven
    until every job is reported: (the gateway, its DeleteObjects calls, the three jobs)."""
    from .conftest import drive, job_ids, pdf_mail, production_env, smtp_send

    gw = await manual_gateway(production_env(
        tmp_path / "var", simulator, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
        S3_PREFIX=prefix, S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region,
        **env))
    calls = _delete_objects_calls(gw.media)
    rcpts = [f"155512300{series}{i}@fax.local" for i in (1, 2, 3)]
    reply = await smtp_send(gw.smtp.port, pdf_mail(rcpts), rcpts)
    assert reply.code == 250 and len(job_ids(reply.text)) == 3, reply.text
    await drive(gw, simulator)
    jobs = [await gw.store.run(gw.store.job, j) for j in job_ids(reply.text)]
    assert [j.state.value for j in jobs if j is not None] == ["reported"] * 3
    return gw, calls, [j for j in jobs if j is not None]


async def test_deletes_asked_for_together_go_in_few_calls(
        seaweed: SeaweedS3, s3_credentials: None, tmp_path: Path) -> None:
    store = media_store(seaweed, f"batch-{tmp_path.name}/")
    await store.start()
    calls = _delete_objects_calls(store)
    try:
        source = tmp_path / "doc.pdf"
        source.write_bytes(b"%PDF-1.4 not much\n")
        keys = [f"doc-{i}.pdf" for i in range(40)]
        await asyncio.gather(*(store.put(key, source) for key in keys))
        await asyncio.gather(*(store.delete(key) for key in keys))
        listed = seaweed.client().list_objects_v2(Bucket="faxgw-test",
                                                  Prefix=f"batch-{tmp_path.name}/")
        assert listed.get("Contents", []) == []
        assert sum(calls) == len(keys) and len(calls) <= 2, calls  # was one call per key
        await store.delete("doc-0.pdf")  # already gone: S3 deletes are idempotent
    finally:
        await store.stop()


async def test_every_waiting_delete_hears_that_s3_refused(
        seaweed: SeaweedS3, s3_credentials: None, tmp_path: Path) -> None:
    store = media_store(seaweed, "x/", bucket="faxgw-no-such-bucket")
    await store.start()
    try:
        results = await asyncio.gather(*(store.delete(f"k{i}.pdf") for i in range(5)),
                                       return_exceptions=True)
        assert all(isinstance(r, MediaError) and str(r).startswith("S3 delete: ")
                   for r in results), results
    finally:
        await store.stop()


async def test_a_purge_deletes_its_messages_objects_in_one_call(
        manual_gateway, seaweed: SeaweedS3, s3_credentials: None, simulator, tmp_path: Path
) -> None:
    """One gateway, one mail to three numbers: three objects (one per job); once every job is
    reported they all go, asked for together, so in one DeleteObjects call."""
    prefix = f"purge-{tmp_path.name}/"
    gw, calls, jobs = await _mail_to_three_numbers_reported(
        manual_gateway, seaweed, simulator, tmp_path, prefix, "2")
    assert len({j.media_key for j in jobs}) == 3
    listed = seaweed.client().list_objects_v2(Bucket="faxgw-test", Prefix=prefix)
    assert listed.get("Contents", []) == []
    assert calls == [3]
    assert list(gw.spool.root.glob("*.pdf")) == []


async def test_the_signed_url_is_the_one_boto3_would_give(
        seaweed: SeaweedS3, s3_credentials: None) -> None:
    """The store signs with its own SigV4 query signer rather than through the client; if
    boto3 signs otherwise one day, this says so before SignalWire does."""
    store = media_store(seaweed, "same/odd name+é/")
    await store.start()
    try:
        for _ in range(3):  # the two must fall within one second (X-Amz-Date)
            ours = await store.url("doc.pdf", 600)
            theirs = store._client.generate_presigned_url(
                "get_object", Params={"Bucket": "faxgw-test", "Key": "same/odd name+é/doc.pdf"},
                ExpiresIn=600)
            if ours == theirs:
                break
        assert ours == theirs
    finally:
        await store.stop()


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8333/faxgw-test/faxgw/abc.pdf",                 # path style, a port
    "https://s3.eu-central-1.amazonaws.com/b/faxgw/odd%20name%2B%C3%A9/doc.pdf",
    "https://bucket.s3.amazonaws.com:443/k~ey.pdf",                     # the default port
    "http://[::1]:9000/b/doc.pdf",                                      # IPv6
    "https://Bucket.S3.example.COM/doc.pdf",                            # upper-case host
])
@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE+token/with=odd&chars"])
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_our_sigv4_presign_is_botocores_to_the_character(url: str, token: str | None,
                                                          method: str) -> None:
    """presign_v4 is ours for speed; botocore's S3 query signer is the reference. Each case
    is signed by botocore, then by ours at the second botocore stamped into its URL."""
    import calendar
    import time
    import urllib.parse

    from botocore.auth import S3SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    from gateway.media_store import presign_v4

    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    request = AWSRequest(method=method, url=url)
    S3SigV4QueryAuth(Credentials("AKIDEXAMPLE", secret, token), "s3", "eu-central-1",
                     expires=900).add_auth(request)
    theirs = str(request.url)
    stamp = urllib.parse.parse_qs(urllib.parse.urlsplit(theirs).query)["X-Amz-Date"][0]
    when = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%SZ"))
    ours = presign_v4(method, url, access_key="AKIDEXAMPLE", secret_key=secret, token=token,
                      region="eu-central-1", ttl_s=900, now=when)
    assert ours == theirs


def test_presigns_in_one_second_are_each_their_own() -> None:
    """presign_v4 keeps what depends only on the second (stamp, query, day's key): requests
    signed in the same second (another method, another object, another fraction of it) and
    in the next one sign what they are, as a presign with nothing kept would."""
    from gateway.media_store import _query_for, presign_v4

    keys = {"access_key": "AKIDEXAMPLE", "secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCY",
            "token": None, "region": "eu-central-1", "ttl_s": 900}
    base = "http://127.0.0.1:8333/faxgw-test/faxgw/"
    when = 1_765_000_000
    asked = [("GET", base + "a.pdf", when + 0.1), ("PUT", base + "b.pdf", when + 0.9),
             ("DELETE", base + "a.pdf", when + 0.5), ("GET", base + "a.pdf", when + 1.2)]
    signed = [presign_v4(m, u, now=t, **keys) for m, u, t in asked]  # type: ignore[arg-type]
    fresh = []
    for m, u, t in asked:
        _query_for.cache_clear()
        fresh.append(presign_v4(m, u, now=t, **keys))  # type: ignore[arg-type]
    assert signed == fresh and len(set(signed)) == 4
    assert [u.split("X-Amz-Date=")[1][:16] for u in signed] == \
        ["20251206T054640Z"] * 3 + ["20251206T054641Z"]


async def test_a_scan_goes_up_and_comes_back_a_chunk_at_a_time(
        seaweed: SeaweedS3, s3_credentials: None, tmp_path: Path) -> None:
    import os

    from gateway import media_store as media

    store = media_store(seaweed, f"big-{tmp_path.name}/")
    await store.start()
    try:
        source = tmp_path / "scan.pdf"
        source.write_bytes(os.urandom(media.READ_WHOLE_BYTES * 3 + 12345))  # streamed
        await store.put("scan.pdf", source)
        back = tmp_path / "back.pdf"
        await store.fetch("scan.pdf", back)
        assert back.read_bytes() == source.read_bytes()
        async with aiohttp.ClientSession() as http:  # what SignalWire does with the URL
            async with http.get(await store.url("scan.pdf", 60)) as response:
                assert response.status == 200
                assert response.headers["Content-Type"] == "application/pdf"
                assert await response.read() == source.read_bytes()
        await store.delete("scan.pdf")
        with pytest.raises(MediaError, match="NoSuchKey"):
            await store.fetch("scan.pdf", back)
    finally:
        await store.stop()


async def test_a_refusal_names_s3s_reason_and_never_the_signed_url(
        seaweed: SeaweedS3, s3_credentials: None, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "doc.pdf"
    source.write_bytes(b"%PDF-1.4 not much\n")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + seaweed.secret_key)
    refused = await _refused_put(media_store(seaweed, "x/"), source)
    assert refused.startswith("S3 upload to bucket faxgw-test: SignatureDoesNotMatch"), refused
    unreachable = await _refused_put(
        S3MediaStore(bucket="faxgw-test", prefix="", region=seaweed.region,
                     endpoint_url=f"http://127.0.0.1:{_closed_port()}", timeout_s=5), source)
    assert "Cannot connect" in unreachable
    for text in (refused, unreachable, caplog.text):
        assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text


async def _refused_put(store: S3MediaStore, source: Path) -> str:
    """What the store says when it cannot upload `source`."""
    await store.start()
    try:
        with pytest.raises(MediaError) as refused:
            await store.put("doc.pdf", source)
    finally:
        await store.stop()
    return str(refused.value)


def _closed_port() -> int:
    """A port nothing listens on: below the ephemeral range (free_port), where none of the
    run's servers that bind port 0 can land meanwhile."""
    return free_port()


async def test_a_request_s3_could_not_take_is_tried_again(
        s3_credentials: None, tmp_path: Path) -> None:
    """A 503 SlowDown (or a 5xx of any kind, or a dropped connection): sent again once, as
    boto3's standard retries did."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            seen.append(head.split(b" ", 2)[0])
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            if len(seen) == 1:
                body = b"<Error><Code>SlowDown</Code><Message>Reduce your rate</Message></Error>"
                writer.write(b"HTTP/1.1 503 Slow Down\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    source = tmp_path / "doc.pdf"
    source.write_bytes(b"%PDF-1.4 not much\n")
    store = S3MediaStore(bucket="faxgw-test", prefix="", region="us-east-1",
                         endpoint_url=f"http://127.0.0.1:{port}", timeout_s=5)
    await store.start()
    try:
        await store.put("doc.pdf", source)
        assert seen == [b"PUT", b"PUT"]
        seen.clear()
        seen.append(b"-")  # from now on every request is answered 200
        await store.delete("doc.pdf")
        assert seen == [b"-", b"DELETE"]
    finally:
        await store.stop()
        server.close()
        await server.wait_closed()


async def test_the_proxy_the_environment_names_is_used(
        s3_credentials: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY / HTTPS_PROXY and NO_PROXY, as boto3 honoured them: the request goes to the
    proxy, in absolute form, unless NO_PROXY names the S3 host."""
    from gateway.media_store import env_proxy

    lines: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines.append(head.split(b"\r\n", 1)[0])
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy_url)
    source = tmp_path / "doc.pdf"
    source.write_bytes(b"%PDF-1.4 not much\n")
    store = S3MediaStore(bucket="faxgw-test", prefix="p/", region="us-east-1",
                         endpoint_url="http://s3.example.invalid:9000", timeout_s=5)
    await store.start()
    try:
        await store.put("doc.pdf", source)
    finally:
        await store.stop()
        server.close()
        await server.wait_closed()
    assert len(lines) == 1
    assert lines[0].startswith(b"PUT http://s3.example.invalid:9000/faxgw-test/p/doc.pdf?")
    monkeypatch.setenv("NO_PROXY", "s3.example.invalid")
    assert env_proxy("http://s3.example.invalid:9000/faxgw-test/") is None
    assert env_proxy("http://other.example.invalid/") == proxy_url


async def test_reports_ending_together_purge_their_message_once(
        manual_gateway, seaweed: SeaweedS3, s3_credentials: None, simulator, tmp_path: Path
) -> None:
    """The last reports of one message ending at once (the worker starts the steps it
    claims together) purge it once; a clean-up after the purge finds nothing left to do."""
    import dataclasses

    prefix = f"once-{tmp_path.name}/"
    gw, calls, jobs = await _mail_to_three_numbers_reported(
        manual_gateway, seaweed, simulator, tmp_path, prefix, "3",
        DOCUMENT_RETENTION_HOURS="1")  # no purge at the reports: the test does them
    gw.worker.s = dataclasses.replace(gw.worker.s, queue=dataclasses.replace(
        gw.worker.s.queue, document_retention_hours=0))
    purges: list[str] = []
    mark_purged = gw.store.mark_purged

    def counted(message_id: str) -> None:
        purges.append(message_id)
        mark_purged(message_id)

    gw.store.mark_purged = counted  # type: ignore[method-assign]
    await asyncio.gather(*(gw.worker._cleanup(j) for j in jobs))
    assert calls == [3] and len(purges) == 1
    await gw.worker._cleanup(jobs[0])  # later: purged already
    assert calls == [3] and len(purges) == 1
    listed = seaweed.client().list_objects_v2(Bucket="faxgw-test", Prefix=prefix)
    assert listed.get("Contents", []) == []
