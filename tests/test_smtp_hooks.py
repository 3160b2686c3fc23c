"""What gateway/smtp/aiosmtpd_compat.py relies on inside aiosmtpd, beyond its handler hooks.

If aiosmtpd changes any of these, this test fails with the name of what changed, before a
scanner finds out. Then re-read smtp/aiosmtpd_compat.py against the new aiosmtpd and raise the
pin in pyproject.toml. The module's OVERRIDES and LEANED_ON lists must name everything it
overrides or uses of aiosmtpd's, and nothing else in gateway/ may reach into aiosmtpd."""

from __future__ import annotations

import ast
import hashlib
import inspect
from importlib.metadata import version
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, TLSSetupException, syntax

from gateway.smtp import aiosmtpd_compat as compat
from gateway.smtp.aiosmtpd_compat import AIOSMTPD_STARTTLS_FIRST, FaxEnvelope, FaxSMTP


def params(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_pinned_version() -> None:
    major, minor = (int(x) for x in version("aiosmtpd").split(".")[:2])
    assert (major, minor) == (1, 4), "aiosmtpd outside the pinned 1.4 series"


def test_overridden_and_called_methods_keep_their_signatures() -> None:
    expected = {
        "smtp_DATA": ["self", "arg"],
        "smtp_AUTH": ["self", "arg"],
        "smtp_MAIL": ["self", "arg"],
        "smtp_RCPT": ["self", "arg"],
        "_handle_client": ["self"],
        "_timeout_cb": ["self"],
        "_reset_timeout": ["self", "duration"],
        "_create_envelope": ["self"],
        "_set_post_data_state": ["self"],
        "_call_handler_hook": ["self", "command", "args"],
        "check_helo_needed": ["self", "helo"],
        "check_auth_needed": ["self", "caller_method"],
        "push": ["self", "status"],
        "connection_made": ["self", "transport"],
        "connection_lost": ["self", "error"],
        "challenge_auth": ["self", "challenge", "encode_to_b64", "log_client_response"],
    }
    for name, names in expected.items():
        assert params(getattr(SMTP, name)) == names, f"aiosmtpd SMTP.{name} changed"
    for name in ("smtp_DATA", "smtp_AUTH", "smtp_MAIL", "smtp_RCPT", "_handle_client",
                 "_timeout_cb", "_create_envelope", "push", "connection_made", "connection_lost"):
        assert params(getattr(FaxSMTP, name)) == params(getattr(SMTP, name)), name


def test_the_address_parse_is_aiosmtpds_own() -> None:
    """FaxSMTP._getaddr is aiosmtpd's parse without its per-call class: same answers."""
    ours, theirs = object.__new__(FaxSMTP), object.__new__(SMTP)
    samples = ["", "<>", "<a@b.c>", " <a@b.c> SIZE=100", "a@b.c", "<a@b.c", "a b@c.d",
               "<\"odd name\"@b.c> BODY=8BITMIME", "<@route:a@b.c>", "<é@b.c> SMTPUTF8",
               "<" + "x" * 70 + "@b.c>", "<a@[127.0.0.1]>", "garbage<<>>", "<a@b.c> <d@e.f>"]
    for limit in (0, 64):
        ours.local_part_limit = theirs.local_part_limit = limit
        for arg in samples:
            assert ours._getaddr(arg) == theirs._getaddr(arg), (limit, arg)
    assert params(SMTP._getaddr) == ["self", "arg"]


def test_the_fast_path_of_the_address_parse_agrees_with_aiosmtpd() -> None:
    """Plain <local@domain> paths skip the stdlib's parser: on paths of every near shape
    (dots in odd places, quotes, comments, routes, literals, spaces, non-ASCII), random ones
    included, the answer is still aiosmtpd's."""
    import random

    ours, theirs = object.__new__(FaxSMTP), object.__new__(SMTP)
    samples = ["<a@b>", "<a.b@c.d>", "<a..b@c.d>", "<.a@b.c>", "<a.@b.c>", "<a@b..c>",
               "<a@.b>", "<a@b.>", "<a@-b.c>", "<a+tag@b.c> SIZE=5", "<A.B@C.D>BODY=8BITMIME",
               "<a@b.c> ", "<a@b.c>x", " <a@b.c>", "<a @b.c>", "<a@ b.c>", "<\"a\"@b.c>",
               "<a(c)@b.c>", "<a@[1.2.3.4]>", "<a@b_c.d>", "<é@b.c>", "<a@b.c", "<<a@b.c>>",
               "<{}|~!#$%&'*+/=?^_`@x>", "<a@b@c>", "<@r:a@b.c>", "<a@b.c>>"]
    rng = random.Random(5321)
    alphabet = "ab.@<>- \"()[]:;,+=~_9é"
    samples += ["<" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) + ">"
                + rng.choice(["", " SIZE=1", ">", "x"]) for _ in range(3000)]
    for limit in (0, 3):
        ours.local_part_limit = theirs.local_part_limit = limit
        for arg in samples:
            assert ours._getaddr(arg) == theirs._getaddr(arg), (limit, arg)


def test_internals_the_overrides_lean_on() -> None:
    init = inspect.getsource(SMTP.__init__)
    # The StreamReader's limit comes from the class attribute FaxSMTP raises for DATA.
    assert "limit=self.line_length_limit" in init
    assert "self._timeout_duration" in init
    client = inspect.getsource(SMTP._handle_client)
    # The greeting is sent from _handle_client, commands are read from self._reader, the
    # timer is reset per command, and the STARTTLS-required reply is the string rewritten.
    assert "await self.push('220" in client
    assert "self._reader.readuntil()" in client
    assert "self._reset_timeout()" in client
    assert repr(AIOSMTPD_STARTTLS_FIRST) in client
    assert "TLSSetupException" in client and "handle_exception" in client
    handle_exception = inspect.getsource(SMTP.handle_exception)
    assert "self.event_handler, 'handle_exception'" in handle_exception
    assert "self.transport.close()" in inspect.getsource(SMTP._timeout_cb)
    assert "raise TLSSetupException() from error" in inspect.getsource(SMTP.smtp_STARTTLS)
    reset = inspect.getsource(SMTP._reset_timeout)
    assert "call_later" in reset and "self._timeout_cb" in reset
    # FaxSMTP._reset_timeout keeps its timer in aiosmtpd's attribute, which aiosmtpd cancels
    # when the connection goes.
    assert "self._timeout_handle.cancel()" in inspect.getsource(SMTP.connection_lost)
    assert "self._timeout_handle: Optional[asyncio.TimerHandle] = None" in init
    assert "self.envelope = self._create_envelope()" in inspect.getsource(
        SMTP._set_post_data_state)
    assert issubclass(TLSSetupException, Exception) and callable(syntax)


def test_what_the_dsn_and_auth_parameter_overrides_lean_on() -> None:
    """FaxSMTP.smtp_MAIL / smtp_RCPT take RET, ENVID, AUTH=, NOTIFY and ORCPT off the line
    before aiosmtpd's own parse (which answers 555 to any parameter it does not know), and
    give every connection its own command_size_limits (aiosmtpd's is one dict on its class,
    which its EHLO adds to), set after EHLO by FaxHandler.handle_EHLO."""
    for name in ("smtp_MAIL", "smtp_RCPT"):
        source = inspect.getsource(getattr(SMTP, name))
        keyword = "FROM:" if name == "smtp_MAIL" else "TO:"
        # The line is the keyword, the address as _getaddr parses it, then blank-separated
        # parameters; only an extended (EHLO) session may give parameters.
        assert f"self._strip_command_keyword('{keyword}', arg)" in source, name
        assert "self._getaddr(arg)" in source, name
        assert ".upper().split()" in source and "self._getparams(" in source, name
        assert "if not self.session.extended_smtp and" in source, name
        assert "not recognized or not implemented" in source, name
    strip = inspect.getsource(SMTP._strip_command_keyword)
    assert "arg[:keylen].upper() == keyword" in strip and "arg[keylen:].strip()" in strip
    client = inspect.getsource(SMTP._handle_client)
    assert "self.command_size_limits[command]" in client
    assert "else self.command_size_limit" in client
    assert "self.command_size_limits['MAIL'] += 26" in inspect.getsource(SMTP.smtp_EHLO)
    assert "self.command_size_limits['MAIL'] += 10" in inspect.getsource(SMTP.smtp_EHLO)
    # The EHLO hook gets the lines so far with "250 HELP" last, and the server first.
    ehlo = inspect.getsource(SMTP.smtp_EHLO)
    assert "response.append('250 HELP')" in ehlo
    assert 'self._call_handler_hook("EHLO", hostname, response)' in ehlo
    assert "hook(self, self.session, self.envelope, *args)" in inspect.getsource(
        SMTP._call_handler_hook)
    assert FaxSMTP.smtp_MAIL.__smtp_syntax__ == SMTP.smtp_MAIL.__smtp_syntax__  # type: ignore
    assert FaxSMTP.smtp_RCPT.__smtp_syntax__ == SMTP.smtp_RCPT.__smtp_syntax__  # type: ignore


def test_data_and_auth_overrides_keep_their_help_syntax() -> None:
    assert FaxSMTP.smtp_DATA.__smtp_syntax__ == "DATA"  # type: ignore[attr-defined]
    assert FaxSMTP.smtp_AUTH.__smtp_syntax__.startswith("AUTH")  # type: ignore[attr-defined]


async def test_protocol_has_the_reader_writer_and_envelope_it_uses() -> None:
    class Handler:
        pass

    proto = SMTP(Handler())
    connected = inspect.getsource(SMTP._cb_client_connected)
    assert "self._reader = reader" in connected and "self._writer = writer" in connected
    assert isinstance(proto._create_envelope(), Envelope)  # noqa: SLF001
    assert issubclass(FaxEnvelope, Envelope)
    for field in ("mail_from", "mail_options", "rcpt_tos", "rcpt_options"):
        assert hasattr(FaxEnvelope(), field), field


async def test_the_short_dir_finds_every_command_mechanism_and_hook() -> None:
    """FaxSMTP and FaxHandler answer `dir()` with only the names aiosmtpd's __init__ looks
    its commands, AUTH mechanisms and hooks up by; it must find the same ones as over the
    whole class. If aiosmtpd starts to look things up by another prefix, this fails."""
    import asyncio

    from gateway.smtp.server import FaxHandler

    handler = object.__new__(FaxHandler)
    ours = FaxSMTP(handler, set(), loop=asyncio.get_running_loop())

    class Whole(FaxSMTP):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    class WholeHandler(FaxHandler):
        def __dir__(self) -> list[str]:
            return object.__dir__(self)

    whole = Whole(object.__new__(WholeHandler), set(), loop=asyncio.get_running_loop())
    assert ours._smtp_methods.keys() == whole._smtp_methods.keys()  # noqa: SLF001
    assert ours._auth_methods.keys() == whole._auth_methods.keys()  # noqa: SLF001
    assert ours._handle_hooks.keys() == whole._handle_hooks.keys()  # noqa: SLF001
    assert {"DATA", "AUTH", "EHLO", "STARTTLS"} <= ours._smtp_methods.keys()  # noqa: SLF001
    assert {"RCPT", "DATA", "EHLO"} <= ours._handle_hooks.keys()  # noqa: SLF001
    # Where aiosmtpd looks them up, and the EHLO hook's signature it reads every time.
    init = inspect.getsource(SMTP.__init__)
    assert "inspect.getmembers(obj)" in init and "for m in dir(handler)" in init
    assert "for m in dir(self)" in init
    assert "inspect.signature(ehlo_hook)" in init
    assert ours._ehlo_hook_ver == "new"  # noqa: SLF001
    assert "__signature__" in vars(FaxHandler.handle_EHLO)


# sha256 (first 16 hex digits) of the source of every aiosmtpd 1.4.6 method that
# gateway/smtp/aiosmtpd_compat.py overrides or calls. A different aiosmtpd fails here with the
# method's name: re-read the override against the new source, then update the hash.
AIOSMTPD_SOURCES = {
    "__init__": "8a9ca80f23ad9bf2",
    "_call_handler_hook": "6ff23a6634ea0307",
    "_cb_client_connected": "a73e95bb7f362ab9",
    "_create_envelope": "54afceea638744d4",
    "_getaddr": "0aeb21c56ac1260e",
    "_getparams": "ca3dd15943d34dcc",
    "_handle_client": "0e4d096403af6c74",
    "_reset_timeout": "fef19b94d28dff31",
    "_set_post_data_state": "1dc8a8abca2a8164",
    "_strip_command_keyword": "2228557170f63ec4",
    "_timeout_cb": "10a7351f9bec2818",
    "challenge_auth": "7ca4c59374e53538",
    "check_auth_needed": "812bbc794078b1b0",
    "check_helo_needed": "9829bb73251c983e",
    "connection_lost": "d3bf6349bc3c25c1",
    "connection_made": "77a45df5065bba34",
    "handle_exception": "33be80d97d2d75ee",
    "push": "15f4f1de5e30c337",
    "smtp_AUTH": "79078b308377ac48",
    "smtp_DATA": "3a33f30d3fd6d02f",
    "smtp_EHLO": "1d91592dd954c4cd",
    "smtp_MAIL": "80dd938e7791acfb",
    "smtp_RCPT": "a0d6605883c0e608",
    "smtp_STARTTLS": "6565289f4131fa13",
}


def _compat_tree() -> ast.Module:
    return ast.parse(inspect.getsource(compat))


def test_every_overridden_or_called_aiosmtpd_method_is_the_pinned_source() -> None:
    """Every aiosmtpd method the compat module overrides or calls has the source it was
    written against, and every one of them is pinned here."""
    methods = {n for n in {*compat.OVERRIDES, *compat.LEANED_ON}
               if inspect.isfunction(getattr(SMTP, n, None))}
    assert methods == AIOSMTPD_SOURCES.keys()
    for name, digest in AIOSMTPD_SOURCES.items():
        source = inspect.getsource(getattr(SMTP, name))
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, (
            f"aiosmtpd SMTP.{name} changed: re-read gateway/smtp/aiosmtpd_compat.py against it")
    # The plain attributes: their values and where aiosmtpd keeps them.
    assert SMTP.line_length_limit == 1001 and SMTP.command_size_limit == 512
    assert isinstance(SMTP.command_size_limits, dict)
    assert "__dir__" not in vars(SMTP)  # object's: aiosmtpd's __init__ calls dir(self)


async def test_the_overrides_list_is_exactly_what_faxsmtp_overrides() -> None:
    """OVERRIDES names every aiosmtpd attribute FaxSMTP replaces, on the class or per
    connection, and nothing else."""
    import asyncio

    from gateway.smtp.server import FaxHandler

    ours = FaxSMTP(object.__new__(FaxHandler), set(), loop=asyncio.get_running_loop())
    on_class = {n for n in vars(FaxSMTP) if hasattr(SMTP, n)
                and n not in ("__module__", "__doc__", "__qualname__", "__annotations__",
                              "__firstlineno__", "__static_attributes__", "__dict__",
                              "__weakref__")}
    plain = SMTP(object.__new__(FaxHandler), loop=asyncio.get_running_loop())
    per_connection = {n for n in vars(ours) if hasattr(SMTP, n) and n not in vars(plain)}
    assert on_class | per_connection == set(compat.OVERRIDES)
    assert len(compat.OVERRIDES) == len(set(compat.OVERRIDES))


def test_every_aiosmtpd_internal_the_module_touches_is_listed() -> None:
    """An attribute of aiosmtpd's SMTP (or a private one of its instances) used anywhere in the
    compat module is in OVERRIDES or LEANED_ON, so the two lists stay the module's truth."""
    tree = _compat_tree()
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "FaxSMTP":
            own |= {n.name for n in node.body
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
            own |= {t.attr for n in ast.walk(node) if isinstance(n, ast.Assign | ast.AnnAssign)
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Attribute)}
    listed = {*compat.OVERRIDES, *compat.LEANED_ON}
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name | ast.Call)
            and (hasattr(SMTP, n.attr) or n.attr.startswith("_")) and not n.attr.startswith("__")}
    # self.X, super().X, SMTP.X: anything of aiosmtpd's not defined by FaxSMTP itself.
    unlisted = {n for n in used - own - listed
                if hasattr(SMTP, n) or n in ("_reader", "_writer")}
    assert not unlisted, f"aiosmtpd internals used but not listed: {sorted(unlisted)}"
    assert set(compat.OVERRIDES) - {"__init__", "__dir__", "line_length_limit",
                                    "command_size_limits"} <= own


def test_nothing_else_in_gateway_reaches_into_aiosmtpd() -> None:
    """Outside the compat module, gateway/ imports only aiosmtpd's public names, subclasses
    none of its classes, and touches no private attribute of a server or session."""
    import gateway

    root = Path(gateway.__file__).parent
    public = {"MISSING", "SMTP", "Envelope", "Session", "TLSSetupException"}
    for path in root.rglob("*.py"):
        if path.name == "aiosmtpd_compat.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
                assert node.module == "aiosmtpd.smtp", path
                assert {a.name for a in node.names} <= public, path
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
                assert not bases & {"SMTP", "Envelope", "Session"}, (path, node.name)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("server", "session") and node.attr.startswith("_"):
                raise AssertionError(f"{path}: {node.value.id}.{node.attr}")

