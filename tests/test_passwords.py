"""Password hashes, the users file and failed-login throttling."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.users import (
    LoginThrottle,
    User,
    UsersFile,
    UsersFileError,
    authenticate,
    client_key,
    format_user,
    hash_password,
    load_users,
    passwd_command,
    verify_password,
    write_user,
)

# One real hash for the tests that only need some valid hash (scrypt is slow on purpose).
HASH = hash_password("correct horse")


# -- hashes ---------------------------------------------------------------------------


def test_hash_format_and_verify() -> None:
    parts = HASH.split("$")
    assert parts[:4] == ["scrypt", "15", "8", "1"]
    assert len(base64.b64decode(parts[4])) == 16
    assert len(base64.b64decode(parts[5])) == 32
    assert verify_password("correct horse", HASH)
    assert not verify_password("correct horsE", HASH)
    assert not verify_password("", HASH)


def test_salt_is_random() -> None:
    assert hash_password("x") != hash_password("x")


def test_unicode_password_is_normalised() -> None:
    encoded = hash_password("caf\u00e9")  # composed
    assert verify_password("cafe\u0301", encoded)  # decomposed, as some keyboards send it


@pytest.mark.parametrize("encoded", [
    "", "scrypt", "plain-text-password", "scrypt$15$8$1$$", "scrypt$15$8$1$AAAA$AAAA",
    "bcrypt$15$8$1$" + HASH.split("$", 4)[4],
    HASH + "$extra",
    HASH.replace("scrypt$15$", "scrypt$x$"),
    HASH.replace("scrypt$15$", "scrypt$-1$"),
    HASH.replace("scrypt$15$", "scrypt$30$"),  # would need 1 TiB: refused, not attempted
    HASH.replace("scrypt$15$8$1$", "scrypt$15$8$999$"),
    HASH[:-4] + "!!!!",  # not base64
    HASH.replace("scrypt$15$", "scrypt$\u0661\u0665$"),  # Arabic-Indic digits
])
def test_malformed_hashes_verify_false(encoded: str) -> None:
    assert verify_password("correct horse", encoded) is False


def test_verify_rejects_non_strings() -> None:
    assert verify_password(b"correct horse", HASH) is False  # type: ignore[arg-type]
    assert verify_password("correct horse", None) is False  # type: ignore[arg-type]


def test_other_scrypt_parameters_are_honoured() -> None:
    import hashlib

    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"pw", salt=salt, n=2 ** 10, r=4, p=2, dklen=24)
    encoded = f"scrypt$10$4$2${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_verify_never_raises_on_garbage(encoded: str) -> None:
    assert verify_password("pw", encoded) in (True, False)


def test_authenticate() -> None:
    users = {"scanner": User("scanner", HASH)}
    assert authenticate(users, "scanner", "correct horse") == users["scanner"]
    assert authenticate(users, "scanner", "wrong") is None
    assert authenticate(users, "nobody", "correct horse") is None


def test_authenticate_ignores_case_of_the_user_name_when_unambiguous() -> None:
    users = {"scanner": User("scanner", HASH), "Bob": User("Bob", HASH),
             "bob": User("bob", HASH)}
    assert authenticate(users, "Scanner", "correct horse") == users["scanner"]
    assert authenticate(users, "SCANNER", "wrong") is None
    assert authenticate(users, "Bob", "correct horse") == users["Bob"]  # exact match first
    assert authenticate(users, "BOB", "correct horse") is None  # two users fold to "bob"


# -- users file -----------------------------------------------------------------------


def test_load_users_all_fields(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        "# comment line\n"
        "\n"
        f"scanner1 {HASH}   from=+15551234567 report=it@example.com\n"
        f"\tlab\t{HASH} senders=lab@example.com,*@lab.example.com  \n"
        "   # indented comment\n"
        f"user:with:colons@example.com {HASH} report=a.b+fax@example.com\n"
    )
    users = load_users(path)
    assert list(users) == ["scanner1", "lab", "user:with:colons@example.com"]
    assert users["scanner1"] == User("scanner1", HASH, "+15551234567", "it@example.com", ())
    assert users["lab"].senders == ("lab@example.com", "*@lab.example.com")
    assert users["lab"].from_number is None and users["lab"].report_to is None
    assert users["user:with:colons@example.com"].report_to == "a.b+fax@example.com"


def test_load_users_reports_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        f"good {HASH}\n"
        "nohash\n"
        f"bad1 {HASH} from=5551234567\n"
        f"bad2 {HASH} colour=blue\n"
        f"bad3 {HASH} report=not-an-address\n"
        "bad4 notahash\n"
        f"good {HASH}\n"
        f"bad5 {HASH} from=+15551234567 from=+15551234568\n"
        f"bad6 {HASH} senders=ok@example.com,,x@example.com\n"
        f"bad7 {HASH} report=\n"
        f"bad8 {HASH} junk\n"
    )
    with pytest.raises(UsersFileError) as info:
        load_users(path)
    problems = info.value.problems
    lines = [int(p.split(":")[1]) for p in problems]
    assert lines == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert all(p.startswith(f"{path}:") for p in problems)
    text = "\n".join(problems)
    assert "no password hash" in text
    assert "from=5551234567 is not an E.164 number" in text
    assert "unknown key 'colour'" in text
    assert "report=not-an-address is not a mail address" in text
    assert "not an scrypt$... hash" in text
    assert "already defined on line 1" in text
    assert "from= appears twice" in text
    assert "report= is empty" in text
    assert "'junk' is not key=value" in text


def test_load_users_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="cannot read the users file"):
        load_users(tmp_path / "absent")


def test_write_user_creates_file_0600_with_header(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert write_user(path, User("scanner", HASH, "+15551234567")) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# faxgw users")
    assert f"scanner {HASH} from=+15551234567\n" in text
    assert load_users(path) == {"scanner": User("scanner", HASH, "+15551234567")}


def test_write_user_replaces_in_place_and_keeps_other_lines(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(f"# mine\nalpha {HASH}\n\n# the lab\nbeta {HASH} report=b@example.com\n"
                    f"gamma {HASH}\n")
    os.chmod(path, 0o644)
    new_hash = hash_password("new")
    assert write_user(path, User("beta", new_hash, senders=("*@lab.example.com",))) is False
    assert path.read_text() == (f"# mine\nalpha {HASH}\n\n# the lab\n"
                                f"beta {new_hash} senders=*@lab.example.com\ngamma {HASH}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name != "users"]  # no temp files left


def test_write_user_refuses_bad_user_and_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "users"
    with pytest.raises(UsersFileError, match="user name must not contain spaces"):
        write_user(path, User("two words", HASH))
    with pytest.raises(UsersFileError, match="not an E.164"):
        write_user(path, User("x", HASH, from_number="12"))
    with pytest.raises(UsersFileError, match="not an scrypt"):
        write_user(path, User("x", "hunter2"))
    with pytest.raises(UsersFileError, match="must not start with #"):
        write_user(path, User("#x", HASH))
    assert not path.exists()
    path.write_text("broken\n")
    with pytest.raises(UsersFileError, match=":1: user 'broken' has no password hash"):
        write_user(path, User("ok", HASH))
    assert path.read_text() == "broken\n"


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "users"
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            write_user(path, User(f"user{i}", HASH))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert set(load_users(path)) == {f"user{i}" for i in range(16)}


def test_format_user_round_trips() -> None:
    user = User("a@b", HASH, "+442079460000", "r@example.com", ("x@example.com", "*.y.com"))
    assert format_user(user) == (f"a@b {HASH} from=+442079460000 report=r@example.com "
                                 "senders=x@example.com,*.y.com")


def test_user_allows_sender() -> None:
    assert User("a", HASH).allows_sender("anyone@anywhere.example")
    lab = User("lab", HASH, senders=("*@lab.example.com",))
    assert lab.allows_sender("Tech@LAB.example.com")
    assert not lab.allows_sender("tech@example.com")


def test_passwd_command_adds_updates_and_keeps_settings(tmp_path: Path) -> None:
    path = tmp_path / "users"
    msg = passwd_command(path, "scanner", "s3cret-scanner", from_number="+15551234567",
                         report_to="it@example.com", senders=["scan@example.com"])
    assert msg == f"user scanner added to {path}"
    user = load_users(path)["scanner"]
    assert verify_password("s3cret-scanner", user.password_hash)
    assert (user.from_number, user.report_to, user.senders) == (
        "+15551234567", "it@example.com", ("scan@example.com",))

    msg = passwd_command(path, "scanner", "n3w-scanner-pw")  # password only: settings kept
    assert msg == f"user scanner updated in {path}"
    user = load_users(path)["scanner"]
    assert verify_password("n3w-scanner-pw", user.password_hash)
    assert not verify_password("s3cret-scanner", user.password_hash)
    assert (user.from_number, user.report_to, user.senders) == (
        "+15551234567", "it@example.com", ("scan@example.com",))

    passwd_command(path, "scanner", "n3w-scanner-pw", from_number="", report_to="", senders=[])
    user = load_users(path)["scanner"]
    assert (user.from_number, user.report_to, user.senders) == (None, None, ())


@pytest.mark.parametrize(("password", "message"), [
    ("", "empty"),
    ("x", "shorter than 10 characters"),
    ("123456789", "shorter than 10 characters"),
    (" padded password", "white space"),
    ("line\nbreak", "line break"),
    ("x" * 1025, "longer than"),
])
def test_passwd_command_refuses_bad_passwords(tmp_path: Path, password: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        passwd_command(tmp_path / "users", "scanner", password)
    assert not (tmp_path / "users").exists()


def test_passwd_command_refuses_bad_values(tmp_path: Path) -> None:
    with pytest.raises(UsersFileError, match="not an E.164"):
        passwd_command(tmp_path / "users", "scanner", "pw-scanner-1", from_number="555-1234")
    with pytest.raises(UsersFileError, match="sender pattern"):
        passwd_command(tmp_path / "users", "scanner", "pw-scanner-1", senders=["bad@"])


def test_users_file_reloads_when_changed_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_user(path, User("a", HASH))
    users_file = UsersFile(path)
    assert set(users_file.users) == {"a"}
    assert users_file.reload_if_changed() is False
    write_user(path, User("b", HASH))
    assert users_file.reload_if_changed() is True
    assert set(users_file.users) == {"a", "b"}
    path.write_text("broken line\n")
    with pytest.raises(UsersFileError):
        users_file.reload_if_changed()
    assert set(users_file.users) == {"a", "b"}


# -- throttling -----------------------------------------------------------------------


def test_lockout_after_five_failures_in_window() -> None:
    throttle = LoginThrottle()
    ip = "192.0.2.10"
    for i in range(4):
        assert throttle.failure(ip, now=100.0 + i) == 0.0
        assert throttle.check(ip, now=100.0 + i) == 0.0
    assert throttle.failure(ip, now=104.0) == 900.0
    assert throttle.check(ip, now=104.0) == 900.0
    assert throttle.check(ip, now=500.0) == pytest.approx(504.0)
    assert throttle.check("192.0.2.11", now=500.0) == 0.0  # other clients unaffected
    assert throttle.check(ip, now=1004.0) == 0.0
    # After the lockout the count starts afresh.
    assert throttle.failure(ip, now=1005.0) == 0.0
    assert throttle.check(ip, now=1005.0) == 0.0


def test_failures_outside_window_are_forgotten() -> None:
    throttle = LoginThrottle(max_failures=3, window_s=60, lockout_s=30)
    ip = "192.0.2.1"
    throttle.failure(ip, now=0.0)
    throttle.failure(ip, now=30.0)
    assert throttle.failure(ip, now=61.0) == 0.0  # the first one has aged out
    assert throttle.failure(ip, now=62.0) == 30.0
    assert throttle.check(ip, now=70.0) == pytest.approx(22.0)


def test_success_clears_failures() -> None:
    throttle = LoginThrottle(max_failures=2)
    throttle.failure("192.0.2.1", now=0.0)
    throttle.success("192.0.2.1")
    assert throttle.failure("192.0.2.1", now=1.0) == 0.0
    assert len(throttle) == 1


def test_ipv4_mapped_and_ipv6_prefix_share_a_key() -> None:
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert (client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9")
            == "2001:db8:1:2::/64")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("not an ip") == "not an ip"
    throttle = LoginThrottle(max_failures=2)
    throttle.failure("::ffff:192.0.2.7", now=0.0)
    throttle.failure("192.0.2.7", now=1.0)
    assert throttle.check("::ffff:192.0.2.7", now=2.0) > 0
    throttle.failure("2001:db8::1", now=0.0)
    throttle.failure("2001:db8::2", now=1.0)
    assert throttle.check("2001:db8::3", now=2.0) > 0


def test_memory_is_bounded_oldest_evicted() -> None:
    throttle = LoginThrottle(max_failures=2, max_ips=100)
    throttle.failure("10.0.0.1", now=0.0)
    throttle.failure("10.0.0.1", now=0.0)
    assert throttle.check("10.0.0.1", now=1.0) > 0
    for i in range(150):
        throttle.failure(f"10.1.{i // 256}.{i % 256}", now=2.0)
    assert len(throttle) == 100
    assert throttle.check("10.0.0.1", now=3.0) == 0.0  # evicted: least recently seen


def test_throttle_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        LoginThrottle(max_failures=0)


def test_delete_user_keeps_the_other_lines(tmp_path: Path) -> None:
    """`faxgw passwd NAME --delete`: the user's line goes; the others, comments and the file's
    mode stay; an unknown user or a broken file changes nothing."""
    from gateway.users import delete_user

    path = tmp_path / "users"
    passwd_command(path, "ann", "pw-ann-long-enough", role="admin")
    passwd_command(path, "bob", "pw-bob-long-enough")
    path.write_text(path.read_text() + "# a note\n")
    assert delete_user(path, "ann") is True
    assert list(load_users(path)) == ["bob"] and path.read_text().endswith("# a note\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert delete_user(path, "ann") is False and delete_user(tmp_path / "none", "x") is False
    path.write_text(path.read_text() + "broken\n")
    before = path.read_text()
    with pytest.raises(UsersFileError):
        delete_user(path, "bob")
    assert path.read_text() == before
