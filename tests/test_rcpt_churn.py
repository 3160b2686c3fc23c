"""RCPT churn is bounded per sender, so one misbehaving client behind an office NAT or a mail
relay locks out only itself: the others at the same address still get their faxes through."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

from gateway.config import AccessSettings, Settings
from gateway.constants import RCPT_CHURN_PER_IP_HOUR, RCPT_CHURN_PER_SENDER_HOUR
from gateway.smtp.access import Access
from gateway.users import User

from .conftest import base_env, job_ids, pdf_mail


async def test_one_churning_sender_does_not_lock_out_its_neighbours(make_gateway,
                                                                    tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))  # 127.0.0.1 is a trusted network

    def run() -> tuple[list[int], tuple[int, bytes], tuple[int, bytes], str]:
        with smtplib.SMTP("127.0.0.1", gw.smtp.port, timeout=30) as client:
            client.ehlo("office-relay")
            codes = []
            # The misbehaving scanner: recipients named and dropped, message after message.
            while len(codes) < RCPT_CHURN_PER_SENDER_HOUR:
                client.mail("scanner@example.com")
                codes += [client.rcpt(f"+1555123{len(codes) + n:04d}@fax.local")[0]
                          for n in range(20)]
                client.rset()
            client.mail("scanner@example.com")
            refused = client.rcpt("+15551239999@fax.local")
            client.rset()
            # A person at the same office, through the same relay.
            client.mail("alice@example.com")
            accepted = client.rcpt("+15551234567@fax.local")
            code, text = client.data(pdf_mail("+15551234567@fax.local").as_bytes())
            assert code == 250, text
            return codes, refused, accepted, text.decode()

    codes, refused, accepted, queued = await asyncio.to_thread(run)
    assert codes == [250] * RCPT_CHURN_PER_SENDER_HOUR
    assert refused == (450, b"4.7.1 Too many recipients tried by <scanner@example.com> from "
                            b"127.0.0.1 without sending; try again in 60 minute(s)")
    assert accepted[0] == 250
    [job_id] = job_ids(queued)
    assert await gw.store.run(gw.store.job, job_id) is not None


def test_churn_counts_per_user_per_sender_and_has_a_bound_per_address() -> None:
    now = [0.0]
    access = Access(Settings(access=AccessSettings(trusted_networks=("192.0.2.0/24",))),
                    clock=lambda: now[0])
    ip = "192.0.2.7"
    first = access.client(ip, None, "a@example.com")
    for _ in range(RCPT_CHURN_PER_SENDER_HOUR):
        assert access.check_destination(first, "+15551234567") is None
    refusal = access.check_destination(first, "+15551234567")
    assert refusal is not None and refusal.words.startswith(
        "Too many recipients tried by <a@example.com> from 192.0.2.7")
    # The same sender name from another address is someone else.
    assert access.check_destination(access.client("192.0.2.8", None, "a@example.com"),
                                    "+15551234567") is None
    # A client making up senders meets the bound of its address, and only then.
    named = RCPT_CHURN_PER_SENDER_HOUR
    n = 0
    while named < RCPT_CHURN_PER_IP_HOUR:
        n += 1
        other = access.client(ip, None, f"made-up-{n}@example.com")
        for _ in range(min(RCPT_CHURN_PER_SENDER_HOUR, RCPT_CHURN_PER_IP_HOUR - named)):
            assert access.check_destination(other, "+15551234567") is None
            named += 1
    refusal = access.check_destination(access.client(ip, None, "new@example.com"),
                                       "+15551234567")
    assert refusal is not None and refusal.words.startswith(
        "Too many recipients tried from 192.0.2.7 without sending")
    # Faxes that were sent give their recipients back, to the sender and its address.
    access.accepted(first, 5)
    assert access.check_destination(first, "+15551234567") is None
    assert access.check_destination(access.client(ip, None, "new@example.com"),
                                    "+15551234567") is None
    now[0] += 3601
    # A logged-in user is one sender whatever envelope sender it writes.
    bob = User(name="bob", password_hash="")
    for n in range(RCPT_CHURN_PER_SENDER_HOUR):
        assert access.check_destination(access.client(ip, bob, f"bob{n}@example.com"),
                                        "+15551234567") is None
    refusal = access.check_destination(access.client(ip, bob, "bob@example.com"), "+15551234567")
    assert refusal is not None and refusal.words.startswith(
        "Too many recipients tried by user bob without sending")
    assert access.check_destination(access.client(ip, None, "new@example.com"),
                                    "+15551234567") is None
