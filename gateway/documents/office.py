"""Office documents (DOCX, ODT, DOC, XLSX and the like) to PDF with LibreOffice, when it is
installed: a process of its own per document, killed with its helpers when it runs too long."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from gateway.documents.convert import ConvertError, _label

log = logging.getLogger(__name__)

MAX_OFFICE_OUTPUT_BYTES = 200 * 1024 * 1024
_OFFICE_EXT = re.compile(r"\.[a-z0-9]{1,5}")


def office_to_pdf(data: bytes, name: str, timeout_s: float = 60) -> bytes:
    """Convert DOCX/ODT/DOC/XLSX and the like with LibreOffice, if it is installed.

    Each run gets its own profile directory, because soffice instances sharing a profile hand
    their work to each other or refuse to start; it runs in its own process group so a hung
    conversion is killed with every helper it spawned.
    """
    label = _label(name)
    soffice = shutil.which("soffice")
    if soffice is None:
        raise ConvertError(f"{label} is an office document; this gateway cannot convert office "
                           "documents (LibreOffice is not installed); send a PDF")
    suffix = Path(name or "").suffix.lower()
    suffix = suffix if _OFFICE_EXT.fullmatch(suffix) else ""
    with tempfile.TemporaryDirectory(prefix="faxgw-office-") as tmp:
        work = Path(tmp)
        source = work / f"document{suffix}"
        source.write_bytes(data)
        outdir = work / "out"
        outdir.mkdir()
        args = [soffice, f"-env:UserInstallation={(work / 'profile').as_uri()}", "--headless",
                "--invisible", "--nologo", "--nodefault", "--nolockcheck", "--norestore",
                "--convert-to", "pdf", "--outdir", str(outdir), str(source)]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, cwd=tmp)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.info("office conversion of %s timed out after %ss", label, timeout_s)
            raise ConvertError(f"{label} took too long to convert; send a PDF") from None
        finally:
            try:  # the whole group: soffice leaves soffice.bin and helpers behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        result = outdir / "document.pdf"
        if code != 0 or not result.is_file():
            log.info("office conversion of %s failed (exit %s)", label, code)
            raise ConvertError(f"{label} could not be converted to PDF; send a PDF")
        if result.stat().st_size > MAX_OFFICE_OUTPUT_BYTES:
            raise ConvertError(f"{label} converts to too large a PDF; send a PDF")
        return result.read_bytes()
