"""The command line when the operator slips: a missing file, output piped into `head`; and
`faxgw send` as a newcomer uses it (the configured gateway, the job id, a body-only mail)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import KNOWN_VARIABLES

from .conftest import base_env, pdf_mail, smtp_send


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name in KNOWN_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_a_missing_file_is_named_not_a_traceback(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.pdf")
    assert main(["send", missing, "--to", "+15551234567", "--server", "127.0.0.1:9"]) == 66
    assert capsys.readouterr().err == (
        f"faxgw send: cannot read {missing}: No such file or directory\n")
    env_file = tmp_path / "faxgw.env"
    env_file.write_text(f"DATA_DIR={tmp_path / 'var'}\n")
    assert main(["receive-sample", "--config", str(env_file), "--to", "+15550100000",
                 missing]) == 66
    assert capsys.readouterr().err == (
        f"faxgw receive-sample: cannot read {missing}: No such file or directory\n")


@pytest.mark.parametrize("command", [["received", "--json"], ["jobs", "--json"], ["jobs"]])
async def test_output_into_a_closed_pipe_ends_quietly(make_gateway, command: list[str],
                                                      tmp_path: Path) -> None:
    """`faxgw received --json | head`: the reader is gone before the listing is written."""
    gw = await make_gateway()
    reply = await smtp_send(gw.smtp.port, pdf_mail("+15551234567@fax.local"),
                            ["+15551234567@fax.local"])
    assert reply.code == 250, reply.text
    env = {k: v for k, v in os.environ.items() if k not in KNOWN_VARIABLES}
    env.update(base_env(tmp_path / "var"))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", *command, env=env, stdout=write_end,
            stderr=asyncio.subprocess.PIPE, cwd=tmp_path)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert err.decode() == ""
    assert proc.returncode == 141


async def test_send_goes_to_smtp_listen_and_prints_the_job_id(
        make_gateway, clean_env: None, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    gw = await make_gateway(base_env(tmp_path / "var", FAX_DOMAIN="faxes.test"))
    env_file = tmp_path / "faxgw.env"
    env_file.write_text(f"SMTP_LISTEN=0.0.0.0:{gw.smtp.port}\nFAX_DOMAIN=faxes.test\n")
    code = await asyncio.to_thread(main, ["send", "--config", str(env_file), "--sample",
                                          "--to", "+15551234567"])
    out, err = capsys.readouterr()
    assert code == 0, err
    [job] = await gw.store.run(gw.store.jobs)
    assert out == (f"sent to +15551234567@faxes.test: 250 2.0.0 Queued as fax job {job.id} "
                   "(1 page)\n")

    # A body-only mail: the text is the page.
    code = await asyncio.to_thread(main, ["send", "--server", f"127.0.0.1:{gw.smtp.port}",
                                          "--domain", "faxes.test", "--to", "+15551234568",
                                          "--body", "Please call me back about the lease."])
    out, err = capsys.readouterr()
    assert code == 0, err
    jobs = {j.to_number: j for j in await gw.store.run(gw.store.jobs)}
    body_job = jobs["+15551234568"]
    assert body_job.id in out
    message = await gw.store.run(gw.store.message, body_job.message_id)
    assert message.pages == 1

    assert main(["send", "--to", "+15551234567", "--server", "127.0.0.1:9"]) == 2
    assert "give files to send, --sample or --body" in capsys.readouterr().err
