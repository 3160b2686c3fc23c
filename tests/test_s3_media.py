"""The S3 media store against a real S3 server (SeaweedFS): deletes asked for together go out
together, and each caller still learns whether its own object went."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.sandbox.s3server import SeaweedS3
from gateway.signalwire.media import MediaError, S3MediaStore


@pytest.fixture
def s3_credentials(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)


def media_store(seaweed: SeaweedS3, prefix: str, bucket: str = "faxgw-test") -> S3MediaStore:
    return S3MediaStore(bucket=bucket, prefix=prefix, region=seaweed.region,
                        endpoint_url=seaweed.endpoint_url, timeout_s=10)


async def test_deletes_asked_for_together_go_in_few_calls(
        seaweed: SeaweedS3, s3_credentials: None, tmp_path: Path) -> None:
    store = media_store(seaweed, f"batch-{tmp_path.name}/")
    await store.start()
    calls: list[int] = []
    # botocore's public event hooks: count the DeleteObjects calls and the keys in each.
    store._client.meta.events.register(
        "provide-client-params.s3.DeleteObjects",
        lambda params, **_: calls.append(len(params["Delete"]["Objects"])))
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
    from .conftest import drive, job_ids, pdf_mail, production_env, smtp_send

    prefix = f"purge-{tmp_path.name}/"
    gw = await manual_gateway(production_env(
        tmp_path / "var", simulator, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
        S3_PREFIX=prefix, S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region))
    calls: list[int] = []
    gw.media._client.meta.events.register(
        "provide-client-params.s3.DeleteObjects",
        lambda params, **_: calls.append(len(params["Delete"]["Objects"])))
    numbers = ["15551230021", "15551230022", "15551230023"]
    reply = await smtp_send(gw.smtp.port, pdf_mail([f"{n}@fax.local" for n in numbers]),
                            [f"{n}@fax.local" for n in numbers])
    assert reply.code == 250 and len(job_ids(reply.text)) == 3, reply.text
    await drive(gw, simulator)
    jobs = [await gw.store.run(gw.store.job, j) for j in job_ids(reply.text)]
    assert [j.state.value for j in jobs if j is not None] == ["reported"] * 3
    assert len({j.media_key for j in jobs if j is not None}) == 3
    listed = seaweed.client().list_objects_v2(Bucket="faxgw-test", Prefix=prefix)
    assert listed.get("Contents", []) == []
    assert calls == [3]
    assert list(gw.spool.root.glob("*.pdf")) == []
