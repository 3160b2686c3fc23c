"""Where settings come from and what `faxgw run` says about them: keys in the .env file reach
boto3, a production configuration must name PUBLIC_BASE_URL, misspelt names are warned about,
`run --check` prints variables, bad values exit 78 and a port in use names its setting."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import KNOWN_VARIABLES, ConfigError, settings_from
from testsupport.harness import DaemonProcess, job_ids
from testsupport.s3server import SeaweedS3

from .conftest import base_env, pdf_mail, smtp_send

PRODUCTION = ("SIGNALWIRE_SPACE_URL=https://example.signalwire.com\nSIGNALWIRE_PROJECT_ID=p\n"
              "SIGNALWIRE_API_TOKEN=sekrit-token\nSIGNALWIRE_SIGNING_KEY=sekrit-key\n"
              "FAX_FROM_NUMBER=+15550100000\n")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the test runner's environment or a ./.env."""
    for name in list(os.environ):
        if name in KNOWN_VARIABLES or name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run_check(env_file: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(["run", "--check", "--config", str(env_file)])
    except SystemExit as exited:
        code = int(exited.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def test_s3_keys_in_the_configuration_file_are_used(seaweed: SeaweedS3,
                                                          tmp_path: Path) -> None:
    """The README's production layout: the AWS keys only in the .env file, none in the
    environment. The daemon starts, and a fax's document goes through SeaweedFS (the
    simulator fetches it from the presigned URL) to a delivered report."""
    env_file = tmp_path / "faxgw.env"
    settings = base_env(tmp_path / "var", MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
                        S3_PREFIX="config-file/", S3_ENDPOINT_URL=seaweed.endpoint_url,
                        S3_REGION=seaweed.region, AWS_ACCESS_KEY_ID=seaweed.access_key,
                        AWS_SECRET_ACCESS_KEY=seaweed.secret_key, ADMIN_LISTEN="")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    daemon = DaemonProcess({}, tmp_path / "daemon.log", args=("--config", str(env_file)),
                           hide=("AWS_",))
    try:
        await daemon.start()
        reply = await smtp_send(daemon.smtp_port, pdf_mail("+15551234567@fax.local"),
                                ["+15551234567@fax.local"])
        assert reply.code == 250, reply.text
        [job_id] = job_ids(reply.text)
        report = tmp_path / "var" / "outbox" / f"{job_id}.eml"
        async with asyncio.timeout(30):
            while not report.exists():
                await asyncio.sleep(0.05)  # polls for the report file the worker writes
        assert "delivered" in report.read_text()
        assert await daemon.terminate() == 0
    finally:
        await daemon.close()
    assert seaweed.secret_key not in daemon.log_path.read_text()


async def test_no_s3_credentials_at_all_is_a_configuration_error(tmp_path: Path) -> None:
    """Not a NoCredentialsError traceback and exit 1 (restarted for ever): exit 78, which the
    unit does not restart, with words naming the variables."""
    env_file = tmp_path / "faxgw.env"
    settings = base_env(tmp_path / "var", MEDIA_STORE="s3", S3_BUCKET="faxgw-test",
                        S3_ENDPOINT_URL="http://127.0.0.1:9", ADMIN_LISTEN="")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    daemon = DaemonProcess({"HOME": str(tmp_path)}, tmp_path / "daemon.log",
                           args=("--config", str(env_file)), hide=("AWS_",))
    with pytest.raises(AssertionError, match="exited early"):
        await daemon.start()
    assert await daemon.wait_exit() == 78
    log = daemon.log_path.read_text()
    assert "S3: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in log
    assert "Traceback" not in log


def test_aws_keys_are_settings_and_their_secrets_are_masked(tmp_path: Path) -> None:
    s = settings_from(base_env(tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE",
                               AWS_SECRET_ACCESS_KEY="very-secret", AWS_SESSION_TOKEN="tok"))
    assert (s.s3.access_key_id, s.s3.secret_access_key) == ("AKIDEXAMPLE", "very-secret")
    printed = s.masked()
    assert printed["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"
    assert printed["AWS_SECRET_ACCESS_KEY"] == printed["AWS_SESSION_TOKEN"] == "********"
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        settings_from(base_env(tmp_path, AWS_ACCESS_KEY_ID="AKIDEXAMPLE"))


def test_production_without_public_base_url_is_refused(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "prod.env"
    env_file.write_text(PRODUCTION)
    code, out, err = run_check(env_file, capsys)
    assert code == 78 and "configuration OK" not in out
    assert "PUBLIC_BASE_URL: required when SIGNALWIRE_SPACE_URL is set" in err
    env_file.write_text(PRODUCTION + "PUBLIC_BASE_URL=https://fax.example.com\n")
    code, out, err = run_check(env_file, capsys)
    assert code == 0 and "configuration OK" in out, err
    # A simulator on this host (tests, the benchmark) reaches the loopback listener itself.
    env_file.write_text(PRODUCTION.replace("https://example.signalwire.com",
                                           "http://127.0.0.1:9999"))
    assert run_check(env_file, capsys)[0] == 0


def test_run_check_prints_the_variables_not_internal_names(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("SMTP_DATA_TIMEOUT_SECONDS=300\nFAX_QUALITY=superfine\nFAX_COVER=yes\n"
                        "TRUSTED_NETWORKS=10.0.0.0/8, 192.168.1.0/24\n")
    code, out, err = run_check(env_file, capsys)
    assert code == 0, err
    lines = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    assert lines["SMTP_DATA_TIMEOUT_SECONDS"] == "300.0"
    assert lines["FAX_QUALITY"] == "superfine"
    # In the variables' own syntax, as they could be written back into the file.
    assert (lines["FAX_COVER"], lines["REPORT_ACCEPTED"]) == ("yes", "no")
    assert lines["TRUSTED_NETWORKS"] == "10.0.0.0/8,192.168.1.0/24"
    assert "smtp_data_timeout_s" not in out and "quality" not in out
    assert set(lines) <= KNOWN_VARIABLES


def test_run_check_prints_dns_nameservers(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tuple of host:port values (not strings) is printed in the variable's own syntax."""
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("SENDER_VERIFY=dmarc\nDNS_NAMESERVERS=127.0.0.1:5353, [::1]:53\n")
    code, out, err = run_check(env_file, capsys)
    assert code == 0, err
    assert "Traceback" not in err
    lines = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    assert lines["DNS_NAMESERVERS"] == "127.0.0.1:5353,[::1]:53"
    assert settings_from({"DNS_NAMESERVERS": lines["DNS_NAMESERVERS"]}).access.dns_nameservers == \
        settings_from({"DNS_NAMESERVERS": "127.0.0.1:5353,[::1]:53"}).access.dns_nameservers


def test_a_misspelt_variable_is_warned_about(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("FAX_QUALTY=superfine\nSMTP_LISTEN=127.0.0.1:2525\nEDITOR=vi\n")
    monkeypatch.setenv("SMTP_LISTN", "0.0.0.0:25")
    monkeypatch.setenv("HOME_PAGE", "x")
    code, out, err = run_check(env_file, capsys)
    assert code == 0
    warnings = [line for line in err.splitlines() if line.startswith("faxgw: warning:")]
    assert warnings == [
        "faxgw: warning: FAX_QUALTY in the configuration file is not a faxgw setting and is "
        "ignored (did you mean FAX_QUALITY?)",
        "faxgw: warning: SMTP_LISTN in the environment is not a faxgw setting and is ignored "
        "(did you mean SMTP_LISTEN?)"]
    # Also when the configuration is refused: the misspelling may be why.
    env_file.write_text(PRODUCTION + "PUBLIC_BASE_URL=https://fax.example.com\n"
                        "FAX_FROM_NUMBR=+15550100001\nFAX_FROM_NUMBER=\n")
    code, out, err = run_check(env_file, capsys)
    assert code == 78
    assert "FAX_FROM_NUMBR in the configuration file is not a faxgw setting" in err


def test_bad_listener_and_tls_values_exit_78_each_said_once(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env_file = tmp_path / "faxgw.env"
    env_file.write_text("SMTPS_LISTEN=bogus\nSMTP_REQUIRE_TLS=maybe\n")
    code, out, err = run_check(env_file, capsys)
    assert code == 78, err
    assert "Traceback" not in err and "ValueError" not in err
    assert err.count("SMTPS_LISTEN: 'bogus' is not host:port") == 1
    assert err.count("SMTP_REQUIRE_TLS: 'maybe' is not yes or no") == 1


@pytest.mark.parametrize("setting", ["SMTP_LISTEN", "HTTP_LISTEN", "ADMIN_LISTEN"])
async def test_a_port_in_use_names_the_setting_that_asked_for_it(setting: str,
                                                                 tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(tmp_path / "var", **{setting: f"127.0.0.1:{port}"})
        full = {k: v for k, v in os.environ.items()
                if k not in KNOWN_VARIABLES and not k.startswith("AWS_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", env={**full, **env},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 69, text
    assert re.search(rf"cannot start: {setting}=127\.0\.0\.1:{port}: Address already in use",
                     text), text
    assert "Traceback" not in text


def test_inbound_routes_into_the_fax_domain_are_refused(
        clean_env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError) as err:
        settings_from(base_env(tmp_path, INBOUND_ROUTES="*=+15551234567@FAX.local"))
    assert err.value.problems == [
        "INBOUND_ROUTES: *=+15551234567@FAX.local is in FAX_DOMAIN (fax.local): each fax "
        "received there would be faxed out again; route it to a mailbox"]
    routes = tmp_path / "routes.txt"
    routes.write_text("+15550100000=desk@example.com,555@faxes.example.com\n")
    env_file = tmp_path / "faxgw.env"
    env_file.write_text(f"FAX_DOMAIN=faxes.example.com\nINBOUND_ROUTES_FILE={routes}\n")
    code, _out, text = run_check(env_file, capsys)
    assert code == 78 and "555@faxes.example.com is in FAX_DOMAIN" in text
    assert settings_from(base_env(tmp_path, INBOUND_ROUTES="*=desk@example.com")
                         ).inbound.routes.enabled
    with pytest.raises(ConfigError, match="INBOUND_ADMIN_ADDRESS: 15551234567@fax.local is in "
                                          "FAX_DOMAIN"):
        settings_from(base_env(tmp_path, INBOUND_ROUTES="*=desk@example.com",
                               INBOUND_ADMIN_ADDRESS="15551234567@fax.local"))
