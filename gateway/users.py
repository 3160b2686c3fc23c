"""SMTP AUTH users: scrypt password hashes, the users file, and failed-login throttling.

Scanners log in with a user name and password typed once into a front panel, so the
passwords are often weak and the devices retry forever with whatever they were given.
Hashes are deliberately slow (scrypt, 32 MiB) and failed logins lock out the client
address for a while; verification is CPU-bound (~50-100 ms), so the SMTP edge must call
`authenticate` / `verify_password` through ``asyncio.to_thread``, never on the loop.

The users file is one user per line, fields separated by spaces or tabs::

    # NAME  HASH                    [from=E164] [report=ADDRESS] [senders=PATTERN,PATTERN]
    #                               [role=ROLE]
    scanner1 scrypt$15$8$1$...$...   from=+15551234567 report=it@example.com
    lab      scrypt$15$8$1$...$...   senders=lab@example.com,*@lab.example.com
    ann      scrypt$15$8$1$...$...   role=admin

``role=admin`` lets a user into the web dashboard with every action, ``role=viewer`` read-only;
without a role a user only sends mail.

Lines whose first non-blank character is ``#`` are comments; blank lines are ignored.  No
value (user name, hash, E.164 number, mail address, sender pattern) contains whitespace,
so there is nothing to quote or escape and ``:`` in a value means nothing special.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import tempfile
import time
import unicodedata
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.rules.policy import SenderPolicy

log = logging.getLogger(__name__)

__all__ = [
    "LoginThrottle",
    "User",
    "UsersFile",
    "UsersFileError",
    "authenticate",
    "client_key",
    "delete_user",
    "format_user",
    "hash_password",
    "load_users",
    "passwd_command",
    "verify_password",
    "write_user",
]

# scrypt cost: N = 2**15, r = 8, p = 1 needs 128 * r * N = 32 MiB, just over OpenSSL's
# default 32 MB maxmem, so maxmem is always computed from the parameters.
SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
# Bounds for parameters read back from the file: a hand-edited or hostile entry must not
# make one login allocate gigabytes or burn minutes of CPU.
_MAX_SCRYPT_MEMORY_BYTES = 256 * 1024 * 1024
_MAX_SCRYPT_WORK = 2 ** 24  # N * r * p; the default is 2**18
MAX_PASSWORD_CHARS = 1024
# `faxgw passwd` refuses shorter ones: a login that guards faxes sent on the company's line
# and the dashboard, tried AUTH_MAX_FAILURES times per address before a lockout.
MIN_PASSWORD_CHARS = 10
MAX_USERNAME_CHARS = 255

_KEYS = ("from", "report", "senders", "role")
# Dashboard roles: an administrator may act on jobs, a viewer only looks.
ROLES = ("admin", "viewer")
_FILE_HEADER = """\
# faxgw users: one SMTP AUTH user per line, fields separated by spaces or tabs.
#   NAME HASH [from=+15551234567] [report=it@example.com] [senders=a@example.com,*@example.org] \
[role=admin]
# HASH comes from `faxgw passwd`.  from= is the caller ID for this user's faxes, report=
# where reports go (default: the envelope sender), senders= the MAIL FROM addresses this
# user may send as (default: any), role= admin or viewer for the web dashboard (default: none).
# Lines starting with # are comments.
"""


class UsersFileError(Exception):
    """Every problem in a users file, one per line, each as ``path:line: problem``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- password hashes ------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _password_bytes(password: str) -> bytes:
    # NFC: the same password typed on a terminal and on a device's panel may arrive
    # composed or decomposed.
    return unicodedata.normalize("NFC", password).encode("utf-8")


def _scrypt_maxmem(log2_n: int, r: int, p: int) -> int:
    # OpenSSL's own estimate (128*r*(N+2) + 128*r*p) plus slack.
    return 128 * r * ((1 << log2_n) + 2 + p) + 1024 * 1024


def hash_password(password: str) -> str:
    """``scrypt$15$8$1$<base64 salt>$<base64 hash>`` for a new random 16-byte salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = hashlib.scrypt(_password_bytes(password), salt=salt, n=1 << SCRYPT_LOG2_N,
                            r=SCRYPT_R, p=SCRYPT_P, dklen=HASH_BYTES,
                            maxmem=_scrypt_maxmem(SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P))
    return f"scrypt${SCRYPT_LOG2_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _small_int(text: str, lo: int, hi: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 3):
        raise ValueError(text)
    value = int(text)
    if not lo <= value <= hi:
        raise ValueError(text)
    return value


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    """(log2 N, r, p, salt, hash) of an encoded hash; ValueError for anything malformed."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not an scrypt hash")
    log2_n = _small_int(parts[1], 1, 24)
    r = _small_int(parts[2], 1, 64)
    p = _small_int(parts[3], 1, 64)
    if (_scrypt_maxmem(log2_n, r, p) > _MAX_SCRYPT_MEMORY_BYTES
            or (1 << log2_n) * r * p > _MAX_SCRYPT_WORK):
        raise ValueError("scrypt parameters too costly")
    try:
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("bad base64") from None
    if not 8 <= len(salt) <= 64 or not 16 <= len(digest) <= 64:
        raise ValueError("salt or hash length out of range")
    return log2_n, r, p, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches ``encoded``; False for a wrong password *or* a
    malformed entry, so one bad line in the users file cannot crash a login."""
    if not isinstance(password, str) or not isinstance(encoded, str):
        return False
    try:
        log2_n, r, p, salt, expected = _parse_hash(encoded)
        actual = hashlib.scrypt(_password_bytes(password), salt=salt, n=1 << log2_n, r=r, p=p,
                                dklen=len(expected), maxmem=_scrypt_maxmem(log2_n, r, p))
    except (ValueError, MemoryError, UnicodeError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """A real hash of a random password: unknown user names cost the same time as known
    ones, so the reply time does not tell an attacker which names exist.  Made on first
    use, not at import, to keep `faxgw --help` fast."""
    return hash_password(secrets.token_urlsafe(16))


def authenticate(users: Mapping[str, User], username: str, password: str) -> User | None:
    """The user if the name exists and the password matches, else None (in about the same
    time either way).  Blocking: call through ``asyncio.to_thread``.

    The name is matched exactly, else ignoring case when that picks one user: scanners and
    people type ``Scanner1`` for ``scanner1``, and a login name is not a secret."""
    user = users.get(username)
    if user is None:
        folded = username.casefold()
        matches = [u for name, u in users.items() if name.casefold() == folded]
        user = matches[0] if len(matches) == 1 else None
    ok = verify_password(password, user.password_hash if user else _dummy_hash())
    return user if ok and user is not None else None


# -- users and the users file ---------------------------------------------------------


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    from_number: str | None = None  # caller ID for this user's faxes; None: FAX_FROM_NUMBER
    report_to: str | None = None  # where reports go; None: the envelope sender
    senders: tuple[str, ...] = ()  # SenderPolicy patterns for MAIL FROM; (): any sender
    role: str | None = None  # "admin" / "viewer": may use the dashboard; None: mail only

    def allows_sender(self, address: str) -> bool:
        """Whether this user may send as ``address`` (MAIL FROM).  No patterns: anyone,
        since the login itself already says who is sending."""
        return not self.senders or SenderPolicy(self.senders).allows(address)


def _check_username(name: str) -> str | None:
    if not name:
        return "the user name is empty"
    if len(name) > MAX_USERNAME_CHARS:
        return f"the user name is longer than {MAX_USERNAME_CHARS} characters"
    if name.startswith("#"):
        return "a user name must not start with #"
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        return "a user name must not contain spaces or control characters"
    return None


def _check_e164(value: str) -> str | None:
    digits = value[1:]
    if value.startswith("+") and digits.isascii() and digits.isdigit() and 7 <= len(digits) <= 15:
        return None
    return f"from={value} is not an E.164 number (+ and 7 to 15 digits, e.g. +15551234567)"


def _check_address(value: str) -> str | None:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(ch.isspace() or ch in "<>,;\""
                                                or not ch.isprintable() for ch in value):
        return f"report={value} is not a mail address"
    return None


def _check_senders(patterns: tuple[str, ...]) -> str | None:
    if any(not p or "," in p for p in patterns):
        return "senders=: a pattern must not be empty or contain a comma"
    try:
        SenderPolicy(patterns)
    except ValueError as exc:
        return f"senders=: {exc}"
    return None


def _user_problems(user: User) -> list[str]:
    problems = [p for p in (
        _check_username(user.name),
        None if _is_hash(user.password_hash) else
        "the password hash is not an scrypt$... hash (create one with `faxgw passwd`)",
        _check_e164(user.from_number) if user.from_number is not None else None,
        _check_address(user.report_to) if user.report_to is not None else None,
        _check_senders(user.senders) if user.senders else None,
        None if user.role is None or user.role in ROLES else
        f"role={user.role} is not one of {', '.join(ROLES)}",
    ) if p]
    return problems


def _is_hash(encoded: str) -> bool:
    try:
        _parse_hash(encoded)
    except ValueError:
        return False
    return True


def _parse_line(line: str) -> tuple[User | None, list[str]]:
    """(user, problems) for one line; (None, []) for comments and blank lines."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None, []
    if len(fields) < 2:
        return None, [f"user {fields[0]!r} has no password hash (NAME HASH [key=value ...])"]
    name, password_hash, *pairs = fields
    values: dict[str, str] = {}
    problems: list[str] = []
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            problems.append(f"{pair!r} is not key=value")
        elif key not in _KEYS:
            problems.append(f"unknown key {key!r} (known: {', '.join(_KEYS)})")
        elif key in values:
            problems.append(f"{key}= appears twice")
        elif not value:
            problems.append(f"{key}= is empty; leave the key out instead")
        else:
            values[key] = value
    if problems:
        return None, problems
    user = User(name=name, password_hash=password_hash, from_number=values.get("from"),
                report_to=values.get("report"),
                senders=tuple(values["senders"].split(",")) if "senders" in values else (),
                role=values.get("role"))
    problems = _user_problems(user)
    return (None, problems) if problems else (user, [])


def format_user(user: User) -> str:
    """The users-file line for ``user`` (no newline)."""
    fields = [user.name, user.password_hash]
    if user.from_number is not None:
        fields.append(f"from={user.from_number}")
    if user.report_to is not None:
        fields.append(f"report={user.report_to}")
    if user.senders:
        fields.append("senders=" + ",".join(user.senders))
    if user.role is not None:
        fields.append(f"role={user.role}")
    return " ".join(fields)


def _parse_text(text: str, where: str) -> dict[str, User]:
    users: dict[str, User] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        user, line_problems = _parse_line(line)
        problems.extend(f"{where}:{lineno}: {p}" for p in line_problems)
        if user is None:
            continue
        if user.name in users:
            problems.append(f"{where}:{lineno}: user {user.name!r} is already defined on line "
                            f"{first_line[user.name]}")
            continue
        users[user.name] = user
        first_line[user.name] = lineno
    if problems:
        raise UsersFileError(problems)
    return users


def load_users(path: str | os.PathLike[str]) -> dict[str, User]:
    """All users in the file by name; UsersFileError listing every bad line (with its line
    number) or an unreadable file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersFileError([f"{path}: cannot read the users file: {exc}"]) from None
    return _parse_text(text, str(path))


def write_user(path: str | os.PathLike[str], user: User) -> bool:
    """Add ``user`` to the file or replace the line of the user with the same name; True
    if added.  Other lines, comments included, are kept as they are.

    The new file replaces the old atomically (temp file, fsync, rename) with mode 0600 and
    the old file's owner where we are allowed to set it, so a root-run `faxgw passwd` does
    not lock the daemon's own user out of the file.  Concurrent writers are serialised
    with a lock on the directory.  An invalid user or a broken existing file raises
    UsersFileError and leaves the file alone.
    """
    path = Path(path)
    problems = _user_problems(user)
    if problems:
        raise UsersFileError([f"{path}: {p}" for p in problems])
    line = format_user(user)
    directory = path.parent if str(path.parent) else Path(".")
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            old_text = path.read_text(encoding="utf-8")
            old_stat: os.stat_result | None = path.stat()
        except FileNotFoundError:
            old_text, old_stat = _FILE_HEADER, None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersFileError([f"{path}: cannot read the users file: {exc}"]) from None
        _parse_text(old_text, str(path))  # refuse to rewrite a file that is already broken
        lines = old_text.splitlines()
        added = True
        for i, old in enumerate(lines):
            fields = old.split()
            if fields and fields[0] == user.name:
                lines[i] = line
                added = False
                break
        if added:
            lines.append(line)
        _atomic_write(path, "\n".join(lines) + "\n", old_stat)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)  # also releases the lock
    return added


def delete_user(path: str | os.PathLike[str], username: str) -> bool:
    """Remove the user's line from the file (`faxgw passwd NAME --delete`); False if there
    was none.  Written like `write_user` (locked, atomic, owner and mode kept); the daemon
    re-reads the file at the next login or dashboard request, which ends the user's
    dashboard sessions."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        try:
            old_text = path.read_text(encoding="utf-8")
            old_stat = path.stat()
        except FileNotFoundError:
            return False
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersFileError([f"{path}: cannot read the users file: {exc}"]) from None
        _parse_text(old_text, str(path))  # refuse to rewrite a file that is already broken
        lines = old_text.splitlines()
        kept = [line for line in lines if line.split()[:1] != [username]]
        if len(kept) == len(lines):
            return False
        _atomic_write(path, "\n".join(kept) + "\n", old_stat)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)  # also releases the lock
    return True


def _atomic_write(path: Path, text: str, old_stat: os.stat_result | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        if old_stat is not None:
            try:
                os.fchown(fd, old_stat.st_uid, old_stat.st_gid)
            except PermissionError:
                pass  # not root: the file stays ours, which it already was
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        raise


def passwd_command(path: str | os.PathLike[str], username: str, password: str,
                   from_number: str | None = None, report_to: str | None = None,
                   senders: Iterable[str] | None = None, role: str | None = None) -> str:
    """Set a user's password (adding the user if new) for ``faxgw passwd``; returns one
    line to print.

    For an existing user, an argument left at None keeps the current value, so changing a
    password does not drop the user's settings; "" clears from=/report=, and an empty
    ``senders`` iterable clears the sender patterns; ``role`` "admin" / "viewer" gives
    the user the dashboard, "" takes it away.  Raises ValueError (bad password) or
    UsersFileError (bad value, broken file), both with a message fit to print.
    """
    if not password:
        raise ValueError("the password is empty")
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValueError(f"the password is shorter than {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_CHARS} characters")
    if password != password.strip() or any(ch in password for ch in "\r\n\0"):
        raise ValueError("the password starts or ends with white space or contains a line "
                         "break; scanners cannot be relied on to send those")
    existing: User | None = None
    if Path(path).exists():
        existing = load_users(path).get(username)
    user = existing or User(name=username, password_hash="")
    if from_number is not None:
        user = replace(user, from_number=from_number or None)
    if report_to is not None:
        user = replace(user, report_to=report_to or None)
    if senders is not None:
        user = replace(user, senders=tuple(s.strip() for s in senders if s.strip()))
    if role is not None:
        user = replace(user, role=role or None)
    user = replace(user, password_hash=hash_password(password))
    added = write_user(path, user)
    return f"user {username} {'added to' if added else 'updated in'} {path}"


class UsersFile:
    """The users file as the daemon sees it: loaded at start, re-read when it changes
    (so `faxgw passwd` takes effect without a restart), the last good copy kept if a
    change breaks it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp = self._read_stamp()
        self.users: dict[str, User] = load_users(self.path)

    def _read_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since the last load; True if reloaded.  On
        UsersFileError the previous users stay in force and the error propagates for the
        caller to log."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return False
        users = load_users(self.path)
        self.users, self._stamp = users, stamp
        return True

    def refresh(self, who: str) -> None:
        """`reload_if_changed`, logged for `who` (the SMTP side, the dashboard): a broken file
        keeps the previous users and says so."""
        try:
            if self.reload_if_changed():
                log.info("%s: users file reloaded: %d user(s)", who, len(self.users))
        except UsersFileError as exc:
            log.error("%s: users file not reloaded, keeping the previous users: %s", who, exc)


# -- failed-login throttling ----------------------------------------------------------


def client_key(ip: str) -> str:
    """The throttling key for a peer address: IPv4 (IPv4-mapped IPv6 unwrapped) as is,
    IPv6 as its /64, because one subscriber or host gets a whole /64 to pick from."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip[:100]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class _Failures:
    __slots__ = ("times", "locked_until")

    def __init__(self, max_failures: int) -> None:
        self.times: deque[float] = deque(maxlen=max_failures)
        self.locked_until = 0.0


class LoginThrottle:
    """Locks a client address out after ``max_failures`` failed logins within
    ``window_s``, for ``lockout_s``.

    Times are monotonic seconds (``time.monotonic()`` unless ``now`` is passed).  At most
    ``max_ips`` addresses are tracked; beyond that the least recently seen is forgotten, so
    a flood of addresses costs bounded memory (and can at worst clear old lockouts early).
    While an address is locked the SMTP edge should refuse AUTH without checking the
    password, so guesses during the lockout cost nothing and teach nothing.
    """

    def __init__(self, max_failures: int = 5, window_s: float = 15 * 60,
                 lockout_s: float = 15 * 60, max_ips: int = 10_000) -> None:
        if max_failures < 1 or window_s <= 0 or lockout_s <= 0 or max_ips < 1:
            raise ValueError("max_failures, window_s, lockout_s and max_ips must be positive")
        self.max_failures = max_failures
        self.window_s = window_s
        self.lockout_s = lockout_s
        self.max_ips = max_ips
        self._entries: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, ip: str, now: float | None = None) -> float:
        """Seconds this address stays locked out; 0.0 when it may try to log in."""
        now = time.monotonic() if now is None else now
        entry = self._entries.get(client_key(ip))
        if entry is None or entry.locked_until <= now:
            return 0.0
        return entry.locked_until - now

    def failure(self, ip: str, now: float | None = None) -> float:
        """Record a failed login; returns the lockout it started (seconds), else 0.0."""
        now = time.monotonic() if now is None else now
        key = client_key(ip)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Failures(self.max_failures)
            while len(self._entries) > self.max_ips:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        while entry.times and entry.times[0] <= now - self.window_s:
            entry.times.popleft()
        entry.times.append(now)
        if len(entry.times) >= self.max_failures:
            entry.times.clear()
            entry.locked_until = now + self.lockout_s
            return self.lockout_s
        return 0.0

    def success(self, ip: str) -> None:
        """A good login forgets the address's failures (a mistyped password is not held
        against a device once it gets it right)."""
        self._entries.pop(client_key(ip), None)
