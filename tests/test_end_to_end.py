"""The whole path with real parts on loopback: smtplib -> gateway SMTP -> SeaweedFS (presigned
SigV4) -> simulator over HTTP -> signed callback -> report through an aiosmtpd relay sink."""

from __future__ import annotations

import io
from pathlib import Path

import aiohttp
from pypdf import PdfReader

from gateway.jobs.outbound_states import State
from gateway.signalwire.signature import compute_signature

from .conftest import (
    PROJECT_ID,
    SIGNING_KEY,
    RelaySink,
    Simulator,
    base_env,
    job_ids,
    make_pdf,
    pdf_mail,
    production_env,
    smtp_send,
    wait_state,
)


async def test_pdf_mail_becomes_fax_via_s3_and_report_via_relay(
        make_gateway, seaweed, simulator: Simulator, relay: RelaySink, tmp_path: Path,
        monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
        S3_PREFIX="e2e", S3_ENDPOINT_URL=seaweed.endpoint_url, S3_REGION=seaweed.region,
        NOTIFY_SMTP_HOST="127.0.0.1", NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none",
        DOCUMENT_RETENTION_HOURS="1"))  # keep the object so the test can fetch it afterwards
    pdf = make_pdf(3)

    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local", pdf=pdf,
                                                   message_id="<orig-1@example.com>"),
                            ["15551234567@fax.local"])
    assert reply.code == 250, reply.text
    assert reply.text.startswith("2.0.0 Queued as fax job ")
    [job_id] = job_ids(reply.text)

    report = await relay.next()
    await simulator.state.wait_idle()

    # SignalWire got exactly one form-encoded send with our parameters...
    assert len(simulator.state.send_requests) == 1
    sent = simulator.state.send_requests[0]
    assert sent["To"] == "+15551234567"
    assert sent["From"] == "+15557654321"
    assert sent["Quality"] == "fine"
    assert sent["Ttl"] == "60"
    # ...whose MediaUrl is a SigV4 presigned SeaweedFS URL the simulator really fetched.
    assert sent["MediaUrl"].startswith(seaweed.endpoint_url + "/faxgw-test/e2e")
    assert "X-Amz-Signature=" in sent["MediaUrl"] and "X-Amz-Algorithm=AWS4-HMAC-SHA256" in \
        sent["MediaUrl"]
    [fetch] = simulator.state.media_fetches
    assert fetch.status == 200
    assert fetch.num_pages == 3
    # The status callback URL is ours, per job, unguessable.
    job = await gw.store.run(gw.store.job, job_id)
    assert sent["StatusCallback"] == job.callback_url
    assert job.callback_token in sent["StatusCallback"]
    assert len(job.callback_token) >= 32

    # The bytes at S3 are the sender's PDF; anonymous access is refused.
    async with aiohttp.ClientSession() as http:
        async with http.get(sent["MediaUrl"]) as resp:
            assert resp.status == 200
            assert await resp.read() == pdf
        async with http.get(sent["MediaUrl"].split("?")[0]) as resp:
            assert resp.status == 403

    # Report: to the From: header, threaded, with the outcome and the number in the subject.
    assert report["To"] == "alice@example.com"
    assert report["Subject"] == "Fax to +1 555-123-4567 delivered, 3 pages"
    assert report["In-Reply-To"] == "<orig-1@example.com>"
    assert "<orig-1@example.com>" in report["References"]
    assert report["Auto-Submitted"] == "auto-replied"
    body = report.get_body(("plain",)).get_content()
    assert "was delivered" in body
    assert f"Fax id:        {job.fax_sid}" in body
    assert relay.envelopes[0] == ("faxgw@faxgw.test", ["alice@example.com"])

    await wait_state(gw, job_id, State.REPORTED)
    job = await gw.store.run(gw.store.job, job_id)
    assert (job.fax_status, job.pages_sent, job.attempt) == ("delivered", 3, 1)
    kinds = [e.kind for e in await gw.store.run(gw.store.events, job_id)]
    assert kinds == ["received", "stored", "submitting", "submitted", "final", "reporting",
                     "reported"]


async def test_sandbox_local_media_and_outbox(make_gateway, tmp_path: Path) -> None:
    """The quick-start path: no credentials, built-in simulator, local media, outbox."""
    gw = await make_gateway(base_env(tmp_path / "var"))
    assert gw.s.sandbox
    reply = await smtp_send(gw.smtp.port, pdf_mail("+15551234567@fax.local"),
                            ["+15551234567@fax.local"])
    assert reply.code == 250, reply.text
    [job_id] = job_ids(reply.text)
    await wait_state(gw, job_id, State.REPORTED)

    outbox = tmp_path / "var" / "outbox" / f"{job_id}.eml"
    text = outbox.read_text()
    assert "Subject: Fax to +1 555-123-4567 delivered, 2 pages" in text
    state = gw.simulator_state
    [sent] = state.send_requests
    assert sent["MediaUrl"].startswith(gw.public_base_url() + "/media/")
    [fetch] = state.media_fetches
    assert fetch.status == 200 and fetch.num_pages == 2
    # After the report, the document is gone from the spool and the media store.
    assert list((tmp_path / "var" / "spool").iterdir()) == []
    assert [p for p in (tmp_path / "var" / "media").iterdir()] == []


async def test_local_media_url_serves_get_and_head_and_refuses_tampering(
        make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var"))
    source = tmp_path / "doc.pdf"
    source.write_bytes(make_pdf(1))
    await gw.media.put("k1.pdf", source)
    url = await gw.media.url("k1.pdf", 60)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "application/pdf"
            assert len(PdfReader(io.BytesIO(await resp.read())).pages) == 1
        async with http.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == source.stat().st_size
        tampered = url[:-3] + ("AAA" if not url.endswith("AAA") else "BBB")
        async with http.get(tampered) as resp:
            assert resp.status == 404
    expired = await gw.media.url("k1.pdf", -1)
    async with aiohttp.ClientSession() as http:
        async with http.get(expired) as resp:
            assert resp.status == 404


async def test_outcomes_by_test_number(make_gateway, simulator: Simulator, relay: RelaySink,
                                       tmp_path: Path) -> None:
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
        NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none", FAX_MAX_ATTEMPTS="1"))
    rcpts = ["15551230000@fax.local", "15551230001@fax.local", "15551230002@fax.local"]
    reply = await smtp_send(gw.smtp.port, pdf_mail(rcpts), rcpts)
    assert reply.code == 250
    assert len(job_ids(reply.text)) == 3
    subjects = sorted([(await relay.next())["Subject"] for _ in rcpts])
    assert subjects == [
        "Fax to +1 555-123-0000 not delivered: the line was busy",
        "Fax to +1 555-123-0001 not delivered: no answer",
        "Fax to +1 555-123-0002 not delivered: the transmission failed",
    ]


async def test_failed_fax_report_carries_error_text_and_advice(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
        NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none", FAX_MAX_ATTEMPTS="1"))
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551230002@fax.local"),
                            ["15551230002@fax.local"])
    assert reply.code == 250
    body = (await relay.next()).get_body(("plain",)).get_content()
    assert "The call dropped prematurely" in body
    assert "voice line" in body


async def test_signalwire_refusal_is_reported_in_plain_words(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    env = production_env(tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
                         NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none")
    gw = await make_gateway(dict(env, SIGNALWIRE_API_TOKEN="wrong-token"))
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    report = await relay.next()
    assert report["Subject"].startswith("Fax to +1 555-123-4567 not sent: SignalWire refused")
    assert "credentials were refused" in report.get_body(("plain",)).get_content()
    job = await gw.store.run(gw.store.job, job_id)
    assert job.error_code == "20003"
    assert simulator.state.send_requests == []


async def test_relay_denied_and_bad_number_at_rcpt(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    reply = await smtp_send(gw.smtp.port, pdf_mail("someone@example.org"),
                            ["someone@example.org"])
    assert reply.code == 550
    assert reply.text.startswith("5.7.1 Relaying denied")
    reply = await smtp_send(gw.smtp.port, pdf_mail("12@fax.local"), ["12@fax.local"])
    assert reply.code == 553
    assert reply.text.startswith("5.1.3 ")
    reply = await smtp_send(gw.smtp.port, pdf_mail("call-me@fax.local"), ["call-me@fax.local"])
    assert reply.code == 553
    jobs = await gw.store.run(gw.store.jobs)
    assert jobs == []


async def test_mixed_recipients_keep_the_good_ones(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    rcpts = ["15551234567@fax.local", "bob@example.org", "FAX=+15551234568@FAX.LOCAL"]
    reply = await smtp_send(gw.smtp.port, pdf_mail(rcpts), rcpts)
    assert reply.code == 250
    assert reply.refused == {"bob@example.org": (550, reply.refused["bob@example.org"][1])}
    ids = job_ids(reply.text)
    numbers = sorted([(await gw.store.run(gw.store.job, i)).to_number for i in ids])
    assert numbers == ["+15551234567", "+15551234568"]


async def test_nothing_to_fax_is_refused_with_554(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    msg = pdf_mail("15551234567@fax.local")
    msg.clear_content()
    msg.set_content("Please open the attached document. It was scanned and sent to you.")
    msg.add_attachment(b"not a document at all", maintype="application",
                       subtype="octet-stream", filename="notes.bin")
    reply = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    assert reply.code == 554
    assert reply.text.startswith("5.6.0 No document to fax found in the message (found: "
                                 "notes.bin)")
    assert await gw.store.run(gw.store.jobs) == []
    assert list((tmp_path / "var" / "spool").glob("*")) == []


async def test_pdf_found_by_content_without_type_or_name(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    msg = pdf_mail("15551234567@fax.local")
    msg.clear_content()
    msg.set_content("scan")
    msg.add_attachment(make_pdf(1), maintype="application", subtype="octet-stream")
    reply = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    assert reply.code == 250, reply.text
    assert "(1 page)" in reply.text


async def test_several_pdfs_merge_in_order(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway()
    msg = pdf_mail("15551234567@fax.local", pdf=make_pdf(1), filename="a.pdf")
    msg.add_attachment(make_pdf(2, landscape=True), maintype="application", subtype="pdf",
                       filename="b.pdf")
    reply = await smtp_send(gw.smtp.port, msg, ["15551234567@fax.local"])
    assert reply.code == 250
    [job_id] = job_ids(reply.text)
    job = await gw.store.run(gw.store.job, job_id)
    message = await gw.store.run(gw.store.message, job.message_id)
    reader = PdfReader(message.document_path)
    # Landscape pages are turned to portrait Letter; nothing is cropped.
    assert [(float(p.mediabox.width), float(p.mediabox.height)) for p in reader.pages] == \
        [(612, 792)] * 3
    assert message.filenames == "a.pdf, b.pdf"


async def test_encrypted_and_broken_pdfs_are_refused(make_gateway, tmp_path: Path) -> None:
    from pypdf import PdfWriter

    gw = await make_gateway()
    writer = PdfWriter()
    writer.add_blank_page(612, 792)
    writer.encrypt(user_password="secret", owner_password="owner")
    buf = io.BytesIO()
    writer.write(buf)
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local", pdf=buf.getvalue()),
                            ["15551234567@fax.local"])
    assert reply.code == 554
    assert "password-protected" in reply.text
    reply = await smtp_send(gw.smtp.port,
                            pdf_mail("15551234567@fax.local", pdf=b"%PDF-1.4\ngarbage"),
                            ["15551234567@fax.local"])
    assert reply.code == 554
    assert "is not a readable PDF" in reply.text


async def test_oversized_message_refused_with_552(make_gateway, tmp_path: Path) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", SMTP_MAX_MESSAGE_BYTES="65536"))
    big = pdf_mail("15551234567@fax.local", pdf=b"%PDF-1.4\n" + b"0" * 100_000)
    reply = await smtp_send(gw.smtp.port, big, ["15551234567@fax.local"])
    assert reply.code == 552


async def _post_callback(url: str, params: dict[str, str], signature: str | None) -> int:
    headers = {"X-SignalWire-Signature": signature} if signature else {}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=params, headers=headers) as resp:
            return resp.status


async def test_callback_signature_is_mandatory_and_duplicates_change_nothing(
        make_gateway, simulator: Simulator, relay: RelaySink, tmp_path: Path) -> None:
    simulator.state.suppress_callbacks = True
    gw = await make_gateway(production_env(
        tmp_path / "var", simulator, NOTIFY_SMTP_HOST="127.0.0.1",
        NOTIFY_SMTP_PORT=str(relay.port), NOTIFY_SMTP_TLS="none"))
    reply = await smtp_send(gw.smtp.port, pdf_mail("15551234567@fax.local"),
                            ["15551234567@fax.local"])
    [job_id] = job_ids(reply.text)
    await wait_state(gw, job_id, State.SUBMITTED)
    job = await gw.store.run(gw.store.job, job_id)
    url = job.callback_url
    params = {"FaxSid": job.fax_sid, "AccountSid": PROJECT_ID, "FaxStatus": "delivered",
              "NumPages": "2", "To": "+15551234567", "From": "+15557654321"}

    # Unsigned, wrongly signed, signed with the wrong key, signed for other params: 403.
    assert await _post_callback(url, params, None) == 403
    assert await _post_callback(url, params, "bm90IGEgc2lnbmF0dXJl") == 403
    assert await _post_callback(url, params, compute_signature("other-key", url, params)) == 403
    forged = dict(params, FaxStatus="failed")
    assert await _post_callback(url, forged, compute_signature(SIGNING_KEY, url, params)) == 403
    # A correct signature but another account: 403.
    other = dict(params, AccountSid="another-project")
    assert await _post_callback(url, other, compute_signature(SIGNING_KEY, url, other)) == 403
    # An unknown token: 404.
    bogus = url.rsplit("/", 1)[0] + "/not-a-token"
    assert await _post_callback(bogus, params, compute_signature(SIGNING_KEY, bogus,
                                                                 params)) == 404
    job = await gw.store.run(gw.store.job, job_id)
    assert job.state is State.SUBMITTED

    # A progress callback is recorded but sends no report.
    progress = dict(params, FaxStatus="sending")
    assert await _post_callback(url, progress, compute_signature(SIGNING_KEY, url,
                                                                 progress)) == 200
    job = await gw.store.run(gw.store.job, job_id)
    assert (job.state, job.fax_status) == (State.SUBMITTED, "sending")

    # The right signature completes the job; a replay and a late contrary status change nothing.
    good = compute_signature(SIGNING_KEY, url, params)
    assert await _post_callback(url, params, good) == 200
    report = await relay.next()
    assert "delivered" in report["Subject"]
    assert await _post_callback(url, params, good) == 200
    late = dict(params, FaxStatus="failed", ErrorMessage="late")
    assert await _post_callback(url, late, compute_signature(SIGNING_KEY, url, late)) == 200
    await wait_state(gw, job_id, State.REPORTED)
    job = await gw.store.run(gw.store.job, job_id)
    assert (job.fax_status, job.error_message) == ("delivered", None)
    events = await gw.store.run(gw.store.events, job_id)
    assert [e.kind for e in events].count("final") == 1
    assert [e.kind for e in events].count("ignored") == 2
    assert [e.kind for e in events].count("callback-refused") == 4
    assert relay.messages.empty()
