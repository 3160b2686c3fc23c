"""Server TLS for the SMTP listeners: contexts that old scanners can talk to, and
certificates that can be renewed without a restart.

Two facts of this host's OpenSSL 3 shape the contexts:

- Python's own default cipher list leaves out every SHA-1 CBC suite, and many TLS 1.2
  scanners offer nothing else (AES128-SHA, ECDHE-RSA-AES128-SHA).  A failed STARTTLS makes
  such a device fail or send in the clear, so the contexts use OpenSSL's ``DEFAULT`` list,
  which keeps them at the system security level (no RC4, 3DES, NULL or anonymous suites).
- OpenSSL 3 refuses TLS 1.0 and 1.1 at security level 1 and above (their handshake
  signatures use SHA-1/MD5).  The legacy settings (``min_version`` TLSv1 or TLSv1.1) must
  therefore also lower the level to 0 (``DEFAULT:@SECLEVEL=0``), which also admits weaker
  keys; it is a per-listener choice for networks that have such devices.

asyncio fixes a listener's SSLContext when the server is created, and aiosmtpd's
``tls_context`` is one object for every STARTTLS.  ``ReloadableTLS`` keeps that object
stable and swaps the certificate in on each handshake instead (see there).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["TLS_VERSIONS", "ReloadableTLS", "cert_fingerprint", "make_server_context"]

TLS_VERSIONS: dict[str, ssl.TLSVersion] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}
_LEGACY = {"TLSv1", "TLSv1.1"}
_CIPHERS = "DEFAULT"
_LEGACY_CIPHERS = "DEFAULT:@SECLEVEL=0"


def make_server_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                        min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context with the certificate chain and key loaded.

    ``min_version`` is one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3 (ValueError otherwise); the
    first two lower OpenSSL's security level to 0, as the module docstring explains.
    Unreadable files or a key that does not match the certificate raise OSError or
    ssl.SSLError.
    """
    version = TLS_VERSIONS.get(min_version)
    if version is None:
        raise ValueError(f"TLS minimum version {min_version!r} is not one of "
                         f"{', '.join(TLS_VERSIONS)}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        # Python deprecates TLS 1.0/1.1; choosing them here is the operator's deliberate act.
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
    ctx.set_ciphers(_LEGACY_CIPHERS if min_version in _LEGACY else _CIPHERS)
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    return ctx


def cert_fingerprint(cert_file: str | os.PathLike[str]) -> str:
    """SHA-256 of the first certificate in a PEM file, as hex, for logs ("which certificate
    is in use?"); ValueError if the file has no PEM certificate."""
    text = Path(cert_file).read_text(encoding="ascii", errors="replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"{cert_file} has no PEM certificate")
    der = ssl.PEM_cert_to_DER_cert(text[start:stop + len(end)] + "\n")
    return hashlib.sha256(der).hexdigest()


class ReloadableTLS:
    """A TLS context whose certificate can be replaced while listeners keep running.

    Hand ``context`` to ``loop.create_server(ssl=...)`` (implicit TLS, port 465) and to
    aiosmtpd's ``tls_context`` (STARTTLS); it is never replaced.  Its ``sni_callback``
    runs on every handshake (OpenSSL calls it whether or not the client sent SNI, so
    scanners that connect by IP address are covered) and switches the connection to the
    most recently loaded context, so after ``reload()`` every new handshake presents the
    new certificate; connections already up keep theirs.

    The protocol versions and cipher list come from ``context`` itself (OpenSSL settles
    them before the switch), the certificate and security level from the loaded one, so
    both are built by ``make_server_context`` with the same ``min_version``.  Changing
    ``min_version`` therefore needs a restart; renewing the certificate does not.
    """

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                 min_version: str = "TLSv1.2") -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.min_version = min_version
        self._stamp = self._file_stamp()
        self.current = make_server_context(self.cert_file, self.key_file, min_version)
        self.fingerprint = cert_fingerprint(self.cert_file)
        self.context = make_server_context(self.cert_file, self.key_file, min_version)
        self.context.sni_callback = self._on_client_hello

    def _on_client_hello(self, ssl_object: ssl.SSLObject | ssl.SSLSocket,
                         server_name: str | None, context: ssl.SSLContext) -> None:
        # Runs inside OpenSSL's handshake: an exception here would abort the handshake with
        # an unhelpful alert, so a failed switch falls back to the start-up certificate.
        try:
            ssl_object.context = self.current
        except Exception:  # noqa: BLE001 - connection boundary, see above
            log.exception("TLS: could not switch a handshake to the current certificate")
        return None

    def _file_stamp(self) -> bytes | None:
        # The contents, not mtime/inode: a renewal written in place within the same clock
        # tick as the last load would otherwise go unnoticed.  Two small files, read at
        # most once per check.
        try:
            return hashlib.sha256(self.cert_file.read_bytes() + b"\0"
                                  + self.key_file.read_bytes()).digest()
        except OSError:
            return None

    def reload(self) -> str:
        """Re-read the certificate and key and use them for new handshakes; returns the
        new certificate's SHA-256 fingerprint.  On failure (missing file, key not matching
        the certificate, e.g. halfway through a renewal) raises and keeps the old one."""
        stamp = self._file_stamp()
        ctx = make_server_context(self.cert_file, self.key_file, self.min_version)
        fingerprint = cert_fingerprint(self.cert_file)
        self.current, self.fingerprint, self._stamp = ctx, fingerprint, stamp
        return fingerprint

    def reload_if_changed(self) -> bool:
        """``reload()`` if either file changed since the last load (for a periodic check
        after ACME renewals, or SIGHUP); True if it reloaded.  Raises as ``reload``."""
        if self._file_stamp() == self._stamp:
            return False
        self.reload()
        return True
