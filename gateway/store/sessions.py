"""Dashboard sessions, their flash messages and the dashboard's login lockouts, in the job store.

The tables come from migration 6 (gateway/store/migrations.py; lockouts use the `hits` table of
migration 4). Every node of a shared store (PostgreSQL) sees the same sessions and lockouts, so
behind a load balancer a request may reach any node; on one node (SQLite) a restart keeps them.

A session is found by the SHA-256 of the cookie's random token: the database never holds the
token itself, so a copy of it (a backup, a replica) logs no one in. Queries are portable SQL
run through the SQL store's public surface (`SqlAccess`: `tx`, `execute`, `rows`), on the
store's thread: `await store.run(sessions.method, ...)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.interfaces import SqlAccess

# Hit kinds (the `hits` table) of the dashboard's failed logins and lockouts, per address.
FAILED, LOCKED = "dash-fail", "dash-lock"
MAX_FLASH_PER_SESSION = 20   # messages not yet shown; older ones go first
MAX_FLASH_CHARS = 1000


@dataclass(frozen=True)
class SessionRow:
    token_hash: str
    user_name: str
    role: str
    password_tag: str
    created_at: float
    expires_at: float
    has_flash: bool


class SessionStore:
    """The dashboard's sessions and lockouts over the job store's connection."""

    def __init__(self, store: object) -> None:
        if not isinstance(store, SqlAccess):
            raise TypeError("dashboard sessions need a SQL job store")
        self.store: SqlAccess = store

    # -- sessions ----------------------------------------------------------------------------

    def create(self, token_hash: str, user_name: str, role: str, password_tag: str,
               now: float, expires_at: float, max_per_user: int) -> None:
        """A new session; expired ones (everyone's) go, and the user's oldest beyond
        `max_per_user`, so the table stays bounded without a housekeeping task."""
        s = self.store
        with s.tx():
            s.execute_later("DELETE FROM dashboard_flash WHERE token_hash IN"
                            " (SELECT token_hash FROM dashboard_sessions WHERE expires_at <= ?)",
                            (now,))
            s.execute_later("DELETE FROM dashboard_sessions WHERE expires_at <= ?", (now,))
            s.execute_later(
                "INSERT INTO dashboard_sessions (token_hash, user_name, role, password_tag,"
                " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (token_hash, user_name, role, password_tag, now, expires_at))
            old = [r["token_hash"] for r in s.rows(
                "SELECT token_hash FROM dashboard_sessions WHERE user_name = ?"
                " ORDER BY created_at DESC, token_hash LIMIT 1000 OFFSET ?",
                (user_name, max_per_user))]
            for key in old:
                self._drop(key)

    def get(self, token_hash: str, now: float) -> SessionRow | None:
        """The live session with this token hash (one read); None once it has expired."""
        row = self.store.one(
            "SELECT token_hash, user_name, role, password_tag, created_at, expires_at,"
            " (SELECT COUNT(*) FROM dashboard_flash f WHERE f.token_hash = s.token_hash)"
            " AS flash FROM dashboard_sessions s WHERE token_hash = ? AND expires_at > ?",
            (token_hash, now))
        if row is None:
            return None
        return SessionRow(row["token_hash"], row["user_name"], row["role"], row["password_tag"],
                          float(row["created_at"]), float(row["expires_at"]),
                          bool(row["flash"]))

    def _drop(self, token_hash: str) -> None:
        self.store.execute_later("DELETE FROM dashboard_flash WHERE token_hash = ?", (token_hash,))
        self.store.execute_later("DELETE FROM dashboard_sessions WHERE token_hash = ?",
                                 (token_hash,))

    def drop(self, token_hash: str) -> None:
        with self.store.tx():
            self._drop(token_hash)

    def drop_user(self, user_name: str, *, unless_tag: str | None = None) -> int:
        """End the user's sessions (all, or those made with another password than
        `unless_tag`); how many."""
        s = self.store
        where, args = "user_name = ?", [user_name]
        if unless_tag is not None:
            where += " AND password_tag <> ?"
            args.append(unless_tag)
        with s.tx():
            s.execute_later("DELETE FROM dashboard_flash WHERE token_hash IN"
                            f" (SELECT token_hash FROM dashboard_sessions WHERE {where})", args)
            return s.execute(f"DELETE FROM dashboard_sessions WHERE {where}", args)

    def add_flash(self, token_hash: str, text: str, now: float) -> None:
        """A message for the session's next page (whichever node serves it)."""
        s = self.store
        with s.tx():
            s.execute_later("INSERT INTO dashboard_flash (token_hash, at, text)"
                            " SELECT token_hash, ?, ? FROM dashboard_sessions"
                            " WHERE token_hash = ?", (now, text[:MAX_FLASH_CHARS], token_hash))
            s.execute_later(
                "DELETE FROM dashboard_flash WHERE token_hash = ? AND id NOT IN (SELECT id FROM"
                " dashboard_flash WHERE token_hash = ? ORDER BY id DESC LIMIT ?)",
                (token_hash, token_hash, MAX_FLASH_PER_SESSION))

    def take_flash(self, token_hash: str) -> list[str]:
        """The session's messages, oldest first, each taken once: two pages loading at the
        same moment never both show one."""
        with self.store.tx():
            rows = self.store.rows("DELETE FROM dashboard_flash WHERE token_hash = ?"
                                   " RETURNING id, text", (token_hash,))
        return [r["text"] for r in sorted(rows, key=lambda r: r["id"])]

    # -- lockouts ----------------------------------------------------------------------------

    def locked_until(self, key: str, now: float, lockout_s: float) -> float | None:
        """When the lockout of this address (a `client_key`) ends; None if it is not locked."""
        last = self.store.scalar("SELECT MAX(at) AS t FROM hits WHERE kind = ? AND hkey = ?",
                                 (LOCKED, key))
        if last is None or float(last) + lockout_s <= now:
            return None
        return float(last) + lockout_s

    def failed(self, key: str, now: float, window_s: float, max_failures: int) -> bool:
        """Count a failed login of this address; True when it starts a lockout. One
        transaction under the hits lock: failures on several nodes at the same moment are
        counted one after the other, so the one that reaches `max_failures` sees it."""
        s = self.store
        with s.tx():
            s.lock("hits")
            s.execute_later("DELETE FROM hits WHERE kind = ? AND hkey = ? AND at <= ?",
                            (FAILED, key, now - window_s))
            s.execute_later("INSERT INTO hits (kind, hkey, at) VALUES (?, ?, ?)",
                            (FAILED, key, now))
            count = int(s.scalar("SELECT COUNT(*) AS n FROM hits WHERE kind = ? AND hkey = ?",
                                 (FAILED, key)) or 0)
            if count < max_failures:
                return False
            s.execute_later("INSERT INTO hits (kind, hkey, at) VALUES (?, ?, ?)",
                            (LOCKED, key, now))
            s.execute_later("DELETE FROM hits WHERE kind = ? AND hkey = ?", (FAILED, key))
        return True

    def succeeded(self, key: str) -> None:
        """A good login forgets the address's failures (not a lockout)."""
        s = self.store
        with s.tx():
            s.lock("hits")
            s.execute_later("DELETE FROM hits WHERE kind = ? AND hkey = ?", (FAILED, key))
