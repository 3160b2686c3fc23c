"""Reassembly of mail split into ``message/partial`` parts (RFC 2046 5.2.2).

Copiers split a large scan into several mails ("divided sending" on Canon and Ricoh devices):
each mail's top-level type is ``message/partial; id=...; number=N; total=T`` and the bodies,
joined in order, are the original message.  Each part is kept durably as it arrives (so a
restart loses nothing the sender was told was received), in a set named by a hash of the
sender and the id (`set_key`), so that parts from different senders with the same id never mix.

Pure functions (`partial_info`, `join`, `check_part`) and what a part's refusal says. The parts
are kept where every gateway node sees them (smtp/partials.py: the media store and the job
store's `partial_sets` and `partials` tables); the on-disk `PartialStore` here is what an
earlier version kept them in, still read so that its sets expire (with their refusal mail).
The SMTP side (what to reply, when to refuse, the refusal mail on expiry) is in
smtp/intake.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from gateway.documents.mime import header_block
from gateway.spool import copy_durable, fsync_dir

__all__ = ["MAX_PARTS", "PartConflict", "PartialError", "PartialInfo", "PartialSet",
           "PartialStore", "Received", "SetsFull", "check_part", "join", "partial_info",
           "set_key"]

log = logging.getLogger(__name__)

MAX_PARTS = 100  # no copier splits a scan finer; bounds files per set and work per join
MAX_OPEN_SETS = 1000  # incomplete sets kept at once; beyond, new sets get a temporary refusal
MAX_ID_CHARS = 256
HEADER_PROBE_BYTES = 64 * 1024
META = "meta.json"
CLAIMED = ".joining"

# RFC 2046 5.2.2.2: these come from the enclosed message, everything else from the first
# enclosing one.
_FROM_ENCLOSED = re.compile(rb"^(content-[^:]*|subject|message-id|encrypted|mime-version)\s*:",
                            re.IGNORECASE)


class PartialError(ValueError):
    """A part that can never be reassembled (bad parameters, too many parts, too large)."""


class PartConflict(PartialError):
    """A part that contradicts its set's earlier parts (other fax numbers, another total):
    refused, and the set keeps waiting for a part that fits (no refusal mail: the set's
    expiry tells the sender once)."""


class SetsFull(Exception):
    """No room for one more incomplete set: this sender's (`per_sender`) or everyone's."""

    def __init__(self, per_sender: bool, held: int) -> None:
        super().__init__(f"{held} incomplete message/partial sets"
                         + (" from this sender" if per_sender else ""))
        self.per_sender = per_sender
        self.held = held


@dataclass(frozen=True)
class PartialInfo:
    id: str
    number: int
    total: int | None  # required on the last part only


def partial_info(content: bytes) -> PartialInfo | None:
    """The message/partial parameters of a raw mail, None when it is not a part.

    Raises PartialError for a part that can never fit (no id, a number out of range).
    """
    block = header_block(content[:HEADER_PROBE_BYTES])
    if b"partial" not in block.lower():
        return None  # nearly every mail: no header parsing on the loop at all
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(block)
    if headers.get_content_type() != "message/partial":
        return None
    ident = str(headers.get_param("id", "", header="content-type") or "").strip()
    number = _int_param(headers.get_param("number", None, header="content-type"))
    total = _int_param(headers.get_param("total", None, header="content-type"))
    if not ident or len(ident) > MAX_ID_CHARS:
        raise PartialError("this message/partial part has no usable id, so it cannot be put "
                           "together with the other parts")
    if number is None or number < 1:
        raise PartialError("this message/partial part has no valid number")
    if (total is not None and (total < 1 or number > total)) or number > MAX_PARTS \
            or (total or 0) > MAX_PARTS:
        raise PartialError(f"the message was split into more than {MAX_PARTS} parts, or a "
                           "part number is out of range; send it in fewer, larger parts")
    return PartialInfo(ident, number, total)


def _int_param(value: object) -> int | None:
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isdigit() and len(text) < 6 else None


def check_part(info: PartialInfo, recipients: list[str], set_total: int | None,
               set_recipients: list[str], held: list[int]) -> None:
    """Raise PartConflict when the part cannot belong with the parts held for its set.

    The numbers are those of the set's first part: a later part may not redirect the scan
    (it may come from anyone who may send here, with the same id)."""
    if sorted(set(recipients)) != sorted(set(set_recipients)):
        raise PartConflict("This part is addressed to other fax numbers than the earlier parts "
                           "of the same split message; every part must be sent to the same "
                           "numbers")
    if info.total is not None and set_total is not None and info.total != set_total:
        raise PartConflict(f"This part says the message has {info.total} parts, but an earlier "
                           f"part said {set_total}; the parts cannot be put together")
    total = info.total or set_total
    if total is not None and max([info.number, *held]) > total:
        raise PartConflict(f"This part says the message has {total} parts, but part "
                           f"{max([info.number, *held])} was sent; the parts cannot be put "
                           "together")


def set_key(sender: str, ident: str) -> str:
    """Directory name for one set: the sender and the id, hashed (ids are sender-chosen text)."""
    return hashlib.sha256(f"{sender.lower()}\0{ident}".encode()).hexdigest()[:40]


def _split(raw: bytes) -> tuple[list[bytes], bytes]:
    """(header fields, each with its folded lines; the body) of one raw message."""
    match = re.search(rb"\r?\n\r?\n", raw)
    head, body = (raw[:match.start()], raw[match.end():]) if match else (raw, b"")
    fields: list[bytes] = []
    for line in re.split(rb"\r?\n", head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields, body


def join(parts: list[bytes]) -> bytes:
    """The original message from its parts, in order (RFC 2046 5.2.2.2).

    The first enclosing mail gives the header fields except Content-*, Subject, Message-ID,
    Encrypted and MIME-Version, which come from the enclosed message; the headers of the
    later enclosing mails are dropped; the bodies are concatenated.
    """
    outer, first_body = _split(parts[0])
    enclosed = first_body + b"".join(_split(p)[1] for p in parts[1:])
    inner, body = _split(enclosed)
    head = [f for f in outer if not _FROM_ENCLOSED.match(f)]
    head += [f for f in inner if _FROM_ENCLOSED.match(f)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass(frozen=True)
class PartialSet:
    key: str
    meta: dict[str, Any]
    numbers: tuple[int, ...]  # part numbers held
    total: int | None
    size: int

    @property
    def complete(self) -> bool:
        return self.total is not None and self.numbers == tuple(range(1, self.total + 1))


class PartialStore:
    """Parts on disk: ``<root>/<key>/<number>`` plus ``meta.json``; every write fsync'ed.

    Not safe for concurrent writers to one set: the caller serialises (intake holds a lock).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(self, key: str, info: PartialInfo, source: bytes | Path, meta: dict[str, Any],
            *, now: float, max_bytes: int) -> PartialSet:
        """Keep one part (a duplicate replaces its twin) and return the set as it stands."""
        folder = self.root / key
        if not folder.is_dir():
            if self.open_sets() >= MAX_OPEN_SETS:
                raise OSError("too many incomplete message/partial sets")
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
        current = self.get(key)
        size = _size(source)
        held = current.size - _size_of(folder / str(info.number)) if current else 0
        if held + size > max_bytes:
            raise PartialError(f"the parts of this message together are larger than "
                               f"{max_bytes} bytes, the most this gateway accepts")
        _write(folder / str(info.number), source)
        old = current.meta if current else {}
        merged = {**meta, **{k: v for k, v in old.items() if k in ("first_seen", "total")}}
        merged.setdefault("first_seen", now)
        if info.total is not None:
            merged["total"] = info.total
        merged["id"] = info.id
        _write(folder / META, json.dumps(merged).encode())
        result = self.get(key)
        assert result is not None
        return result

    def get(self, key: str) -> PartialSet | None:
        folder = self.root / key
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            meta = {} if folder.is_dir() else None
        if meta is None:
            return None
        numbers, size = [], 0
        for entry in folder.iterdir():
            if entry.name.isdigit():
                numbers.append(int(entry.name))
                size += entry.stat().st_size
        total = meta.get("total")
        return PartialSet(key, meta, tuple(sorted(numbers)),
                          total if isinstance(total, int) else None, size)

    def claim(self, key: str) -> list[bytes]:
        """Take a complete set out of the waiting sets (so expiry never sees it) and read it."""
        found = self.get(key)
        assert found is not None and found.complete
        claimed = self.root / (key + CLAIMED)
        os.replace(self.root / key, claimed)
        return [(claimed / str(n)).read_bytes() for n in found.numbers]

    def release(self, key: str, *, keep: bool) -> None:
        """After the join: back among the waiting sets (a temporary failure) or gone."""
        claimed = self.root / (key + CLAIMED)
        if keep and claimed.is_dir() and not (self.root / key).exists():
            os.replace(claimed, self.root / key)
        else:
            shutil.rmtree(claimed, ignore_errors=True)

    def discard(self, key: str) -> None:
        shutil.rmtree(self.root / key, ignore_errors=True)

    def sets(self) -> Iterator[PartialSet]:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.is_dir() and "." not in entry.name and (found := self.get(entry.name)):
                yield found

    def open_sets(self) -> int:
        return sum(1 for e in self.root.iterdir() if e.is_dir()) if self.root.is_dir() else 0

    def expired(self, now: float, timeout_s: float) -> list[PartialSet]:
        """Sets whose first part came more than ``timeout_s`` ago.

        Also deletes claimed sets left by a crash in the middle of a join (older than twice
        the timeout): whether their fax was queued is unknown, so they are never retried.
        """
        if self.root.is_dir():
            for entry in self.root.glob("*" + CLAIMED):
                if time.time() - entry.stat().st_mtime > 2 * timeout_s:  # file times
                    log.warning("message/partial %s: removing a set left half-joined",
                                entry.name[:12])
                    shutil.rmtree(entry, ignore_errors=True)
        return [s for s in self.sets() if self._age(s, now) > timeout_s]

    def _age(self, found: PartialSet, now: float) -> float:
        """How long ago the set's first part came. A set with no meta yet is being written
        right now (its folder is made before its meta file), or was left by a crash between
        the two: its folder's time says which, by file times, with the margin used for
        half-joined sets (it was taken as 0, "1970", and a part arriving while housekeeping
        ran was thrown away)."""
        first = found.meta.get("first_seen")
        if isinstance(first, (int, float)):
            return now - float(first)
        try:
            return (time.time() - (self.root / found.key).stat().st_mtime) / 2
        except OSError:
            return 0.0  # gone meanwhile


def _size(source: bytes | Path) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _write(path: Path, source: bytes | Path) -> None:
    """Atomically: a temporary file, fsync'ed, renamed over the target, the directory synced."""
    if not isinstance(source, bytes):
        copy_durable(source, path)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as out:
        out.write(source)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Received:
    """What became of one incoming mail: not a part, a part kept, or the last part."""

    key: str | None = None
    reply: str | None = None  # the words of the 250 for a part kept while others are missing
    whole: bytes | None = None  # the reassembled message, once every part is here
    owner: str | None = None  # with `whole`: this node's claim on the set (see Partials.done)
