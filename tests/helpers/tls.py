"""A self-signed certificate and key made by openssl, for STARTTLS tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def make_cert(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    """`name`.crt and `name`.key in `directory`, for CN=`common_name`, valid two days."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={common_name}", "-keyout", str(key), "-out", str(crt)],
                   check=True, capture_output=True, timeout=60)
    return crt, key


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The gateway's certificate (gw.crt, gw.key; CN=faxgw.test), one per test module."""
    return make_cert(tmp_path_factory.mktemp("cert"), "gw", "faxgw.test")
