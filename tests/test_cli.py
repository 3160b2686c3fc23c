"""The `faxgw` command line against a live in-process gateway, and config validation."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from pypdf import PdfReader

from gateway.cli import main, sample_pdf
from gateway.config import ConfigError, settings_from
from gateway.jobs.outbound_states import State

from .conftest import base_env, wait_state


def test_sample_pdf_is_one_readable_page() -> None:
    reader = PdfReader(io.BytesIO(sample_pdf("hello")))
    assert len(reader.pages) == 1
    assert "hello" in reader.pages[0].extract_text()


async def test_faxgw_send_against_a_live_gateway(make_gateway, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    gw = await make_gateway()
    doc = tmp_path / "letter.pdf"
    doc.write_bytes(sample_pdf("letter"))
    server = f"127.0.0.1:{gw.smtp.port}"
    code = await asyncio.to_thread(main, ["send", str(doc), "--sample", "--to", "+15551234567",
                                          "--server", server, "--from", "bob@example.com"])
    assert code == 0
    assert "sent to +15551234567@fax.local" in capsys.readouterr().out
    [job] = await gw.store.run(gw.store.jobs)
    await wait_state(gw, job.id, State.REPORTED)
    message = await gw.store.run(gw.store.message, job.message_id)
    assert (message.report_to, message.pages) == ("bob@example.com", 2)
    code = await asyncio.to_thread(main, ["send", "--sample", "--to", "12", "--server", server])
    assert code == 1
    assert "553 5.1.3" in capsys.readouterr().err


def test_run_check_prints_masked_settings(tmp_path: Path, monkeypatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("SIGNALWIRE_SPACE_URL=https://x.signalwire.com\n"
                        "SIGNALWIRE_PROJECT_ID=p\nSIGNALWIRE_API_TOKEN=sekrit-token\n"
                        "SIGNALWIRE_SIGNING_KEY=sekrit-key\nFAX_FROM_NUMBER=+15550100000\n"
                        "PUBLIC_BASE_URL=https://fax.example.com\n")
    for name in ("SIGNALWIRE_SPACE_URL", "FAXGW_ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", "--check", "--config", str(env_file)]) == 0
    out = capsys.readouterr().out
    assert "SIGNALWIRE_SPACE_URL = https://x.signalwire.com" in out
    assert "sekrit" not in out and "configuration OK" in out


def test_bad_config_lists_every_problem_and_exits_78(tmp_path: Path, monkeypatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("SIGNALWIRE_SPACE_URL=https://x.signalwire.com\nFAX_QUALITY=ultra\n"
                        "FAX_TTL_MINUTES=999\nSMTP_LISTEN=nowhere\nMEDIA_STORE=s3\n")
    with pytest.raises(SystemExit) as exited:
        main(["run", "--config", str(env_file)])
    assert exited.value.code == 78
    err = capsys.readouterr().err
    for name in ("FAX_QUALITY", "FAX_TTL_MINUTES", "SMTP_LISTEN", "S3_BUCKET", "FAX_FROM_NUMBER",
                 "SIGNALWIRE_PROJECT_ID", "SIGNALWIRE_API_TOKEN", "SIGNALWIRE_SIGNING_KEY"):
        assert name in err, name


def test_settings_defaults_and_derived_values(tmp_path: Path) -> None:
    s = settings_from(base_env(tmp_path))
    assert s.sandbox and s.media.store == "local" and s.fax.quality == "fine"
    assert s.media.url_ttl_s == 60 * 60 + 3600
    with pytest.raises(ConfigError) as err:
        settings_from(base_env(tmp_path, FAX_TTL_MINUTES="120", MEDIA_URL_TTL_SECONDS="3600"))
    assert "MEDIA_URL_TTL_SECONDS" in str(err.value)
