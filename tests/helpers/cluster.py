"""Several gateways on one queue: a node's settings (PostgreSQL, SeaweedFS S3, the simulator,
the relay sink), S3 credentials in the environment, waiting for every job to be reported, and
mail sent to a node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from testsupport.s3server import SeaweedS3

from ..conftest import RelaySink, Simulator, job_ids, pdf_mail, production_env, smtp_send


def shared_env(tmp_path: Path, name: str, pg_url: str, seaweed: SeaweedS3,
               simulator: Simulator, relay: RelaySink, **extra: str) -> dict[str, str]:
    return production_env(
        tmp_path / name, simulator, DATABASE_URL=pg_url, NODE_ID=name, MEDIA_STORE="s3",
        S3_BUCKET="faxgw-test", S3_PREFIX=f"multi-{tmp_path.name}",
        S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region,
        NOTIFY_SMTP_HOST="127.0.0.1", NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none",
        SIGNALWIRE_TIMEOUT_SECONDS="1", STATUS_POLL_SECONDS="0.5", LEASE_SECONDS="3", **extra)


@pytest.fixture
def s3_credentials(seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)


def db_states(pg_url: str) -> dict[str, str]:
    with psycopg.connect(pg_url) as db:
        return dict(db.execute("SELECT id, state FROM jobs").fetchall())


async def all_reported(pg_url: str, timeout_s: float = 30) -> set[str]:
    """The report mail goes out just before its job is marked reported, on whichever node:
    watch the shared database until every job is."""
    async with asyncio.timeout(timeout_s):
        while (states := set(db_states(pg_url).values())) != {"reported"}:
            await asyncio.sleep(0.1)
    return states


async def send(port: int, number: str, message_id: str | None = None) -> list[str]:
    reply = await smtp_send(port, pdf_mail(f"{number}@fax.local", message_id=message_id),
                            [f"{number}@fax.local"])
    assert reply.code == 250, reply.text
    return job_ids(reply.text)


