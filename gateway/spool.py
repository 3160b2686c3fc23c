"""Durable files: the spool of accepted documents and the outbox, written so a crash never leaves
half a file under a final name and a 250 reply never precedes the bytes reaching the disk."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, name: str, data: bytes, mode: int = 0o640) -> Path:
    """`data` in a new hidden file beside where it will live, fsync'ed: the caller gives it its
    final name (rename or link) and removes it on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_durable(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Write to a temporary name, fsync, rename into place, fsync the directory."""
    tmp = write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def copy_durable(source: Path, path: Path) -> None:
    """`write_durable` for a file already on disk: copied under a temporary name, fsync'ed,
    renamed into place, the directory fsync'ed."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as done:
            os.fsync(done.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Spool:
    """Documents accepted over SMTP, kept until every job of the message is final and reported."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, message_id: str) -> Path:
        return self.root / f"{message_id}.pdf"

    def put(self, message_id: str, data: bytes) -> Path:
        path = self.path_for(message_id)
        write_durable(path, data)
        return path

    def remove(self, message_id: str) -> None:
        self.path_for(message_id).unlink(missing_ok=True)
