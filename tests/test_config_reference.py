"""The settings' one declaration (gateway/config.py) against what is written elsewhere:
docs/configuration.md is rendered from it, config/faxgw.env.example names every variable, and
the loader reads each setting from the variable its declaration names."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from gateway.config import (
    REFERENCE_COMMAND,
    SECRET_VARIABLES,
    VARIABLES,
    Settings,
    declared,
    reference,
    settings_from,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "configuration.md"
EXAMPLE = ROOT / "config" / "faxgw.env.example"


def test_the_configuration_reference_is_the_one_the_code_renders() -> None:
    assert DOCS.read_text() == reference(), (
        f"docs/configuration.md differs from the settings in gateway/config.py; "
        f"regenerate it: {REFERENCE_COMMAND}")


def test_the_reference_command_prints_it() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.config", "--reference"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out == reference()


def test_the_reference_has_each_variable_once_with_its_description() -> None:
    text = reference()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    names = [re.match(r"\| `([A-Z0-9_]+)`", row).group(1) for row in rows]  # type: ignore[union-attr]
    assert sorted(names) == sorted(VARIABLES.values())
    assert len(set(names)) == len(names)
    for _, f in declared():
        assert f.metadata["doc"].strip(), f.metadata["variable"]
    assert "| `LEASE_SECONDS` *advanced* | `30` |" in text
    assert "| `FAX_DOMAIN` | `fax.local` |" in text
    assert len({g.metadata["title"] for g in fields(Settings)}) == len(fields(Settings))


def test_the_example_file_names_every_variable() -> None:
    written = set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", EXAMPLE.read_text(), re.M))
    missing = set(VARIABLES.values()) - written
    assert not missing, f"config/faxgw.env.example lacks {sorted(missing)}"


def test_secrets_are_declared_and_masked(tmp_path: Path) -> None:
    assert {"SIGNALWIRE_API_TOKEN", "SIGNALWIRE_SIGNING_KEY", "NOTIFY_SMTP_PASSWORD",
            "MEDIA_SIGNING_KEY", "METRICS_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
            "DATABASE_URL", "DATABASE_LISTEN_URL"} == SECRET_VARIABLES
    env = {"DATA_DIR": str(tmp_path), "SIGNALWIRE_API_TOKEN": "Zq9-secret-tok-1",
           "METRICS_TOKEN": "Zq9-secret-m-2",
           "MEDIA_SIGNING_KEY": "Zq9-secret-k-3", "NOTIFY_SMTP_USERNAME": "u",
           "NOTIFY_SMTP_PASSWORD": "Zq9-secret-p-4", "AWS_ACCESS_KEY_ID": "AKID",
           "AWS_SECRET_ACCESS_KEY": "Zq9-secret-s-5", "AWS_SESSION_TOKEN": "Zq9-secret-t-6",
           "MEDIA_STORE": "s3",
           "S3_BUCKET": "b", "DATABASE_URL": "postgresql://faxgw:Zq9-secret-pw-7@db:5432/faxgw",
           "DATABASE_LISTEN_URL": "postgresql://faxgw:Zq9-secret-pw-8@db-direct:5432/faxgw"}
    settings = settings_from(env)
    printed = settings.masked()
    assert set(printed) == set(VARIABLES.values())
    text = repr(settings) + "\n".join(printed.values())
    # Values no setting or host name could contain by chance (the node id holds the host's).
    for secret in ("Zq9-secret-tok-1", "Zq9-secret-m-2", "Zq9-secret-k-3", "Zq9-secret-p-4",
                   "Zq9-secret-s-5", "Zq9-secret-t-6", "Zq9-secret-pw-7", "Zq9-secret-pw-8"):
        assert secret not in text
    assert printed["DATABASE_URL"] == "postgresql://faxgw:********@db:5432/faxgw"
    assert printed["DATABASE_LISTEN_URL"] == "postgresql://faxgw:********@db-direct:5432/faxgw"
    assert printed["SIGNALWIRE_API_TOKEN"] == "********"
    # What the logs are told to mask: every secret's value, the database's password alone.
    assert sorted(settings.secret_values()) == sorted(
        ["Zq9-secret-tok-1", "Zq9-secret-m-2", "Zq9-secret-k-3", "Zq9-secret-p-4", "Zq9-secret-s-5",
         "Zq9-secret-t-6", "Zq9-secret-pw-7", "Zq9-secret-pw-8",
         settings.signalwire.signing_key])


# A value unlike the default for each kind of setting; some variables need their own.
SAMPLES = {
    "FAX_DOMAIN": "faxes.example.org", "FAX_DEFAULT_REGION": "GB", "S3_BUCKET": "bucket",
    "TRUSTED_NETWORKS": "10.0.0.0/8", "ADMIN_TRUSTED_PROXIES": "10.1.0.0/16",
    "ALLOWED_SENDERS": "example.org", "FAX_ALLOW_PREFIXES": "+44", "FAX_BLOCK_PREFIXES": "+1900",
    "INBOUND_BLOCKED_CALLERS": "anonymous", "REPORT_BCC": "audit@example.org",
    "SMTP_LISTEN": "127.0.0.1:2526", "HTTP_LISTEN": "127.0.0.1:8027",
    "PUBLIC_BASE_URL": "https://fax.example.org", "S3_ENDPOINT_URL": "https://s3.example.org",
    "SIGNALWIRE_SPACE_URL": "http://127.0.0.1:9", "NOTIFY_FROM": "fax@example.org",
    "NODE_ID": "node-a", "SMTP_HOSTNAME": "fax.example.org", "DATA_DIR": "elsewhere",
}
NEEDS = {  # the partner a variable must not be set without
    "AWS_ACCESS_KEY_ID": {"AWS_SECRET_ACCESS_KEY": "s"},
    "AWS_SECRET_ACCESS_KEY": {"AWS_ACCESS_KEY_ID": "AKID"},
    "NOTIFY_SMTP_USERNAME": {"NOTIFY_SMTP_PASSWORD": "p"},
    "NOTIFY_SMTP_PASSWORD": {"NOTIFY_SMTP_USERNAME": "u"},
    "SIGNALWIRE_SPACE_URL": {"SIGNALWIRE_PROJECT_ID": "p", "SIGNALWIRE_API_TOKEN": "t",
                             "SIGNALWIRE_SIGNING_KEY": "k", "FAX_FROM_NUMBER": "+15550100001"},
    "TLS_CERT_FILE": {"TLS_KEY_FILE": "{file}"}, "TLS_KEY_FILE": {"TLS_CERT_FILE": "{file}"},
    "SMTP_REQUIRE_TLS": {"TLS_CERT_FILE": "{file}", "TLS_KEY_FILE": "{file}"},
    "MEDIA_STORE": {"S3_BUCKET": "bucket"},
}


def _sample(f, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    m, default = f.metadata, f.default
    if m["variable"] in SAMPLES:
        return SAMPLES[m["variable"]]
    kind = m["kind"]
    if kind == "int":
        return str(default + 1)
    if kind == "float":
        return str(default + 0.5)
    if kind == "bool":
        return "no" if default else "yes"
    if kind == "choice":
        return next(c for c in m["choices"] if c != default)
    if kind == "file":
        return "{file}"
    return "sample-text"


@pytest.mark.parametrize("variable", sorted(VARIABLES.values()))
def test_each_setting_is_read_from_its_declared_variable(variable: str, tmp_path: Path) -> None:
    """Setting the variable (with its partner, if it has one) changes that setting: the loader
    and the declaration name the same variable."""
    path = next(p for p, v in VARIABLES.items() if v == variable)
    grp_name, name = path.split(".")
    f = next(f for g, f in declared() if g.name == grp_name and f.name == name)
    if f.metadata["kind"] is None:
        pytest.skip("worked out by hand in settings_from; its own tests cover it")
    file = tmp_path / "some.pem"
    file.write_text("x")
    base = {"DATA_DIR": str(tmp_path), "NODE_ID": "n", "SMTP_HOSTNAME": "h.test",
            "NOTIFY_FROM": "f@h.test"}
    before = settings_from(base)
    env = dict(base, **{k: v.format(file=file) for k, v in NEEDS.get(variable, {}).items()})
    env[variable] = _sample(f, tmp_path).format(file=file)
    after = settings_from(env)
    assert getattr(getattr(after, grp_name), name) != getattr(getattr(before, grp_name), name)
