"""`faxgw` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from gateway import __version__, defaults
from gateway.config import ConfigError, Settings, load_settings_warned
from gateway.constants import EXIT_CONFIG, EXIT_DATA
from gateway.documents.pdf_objects import pdf_from_objects


def _load(args: argparse.Namespace) -> Settings:
    try:
        settings, warnings = load_settings_warned(getattr(args, "config", None))
    except ConfigError as exc:
        for warning in exc.warnings:
            print(f"faxgw: warning: {warning}", file=sys.stderr)
        print("faxgw: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    for warning in warnings:
        print(f"faxgw: warning: {warning}", file=sys.stderr)
    return settings


def _setup_logging(settings: Settings, level: str | None = None) -> None:
    from gateway.runtime import logs

    logs.setup_logging(level or settings.logs.level, settings.logs.format)
    # The secrets' values (DATABASE_URL: its password), and boto3's own from the environment.
    for secret in (*settings.secret_values(), os.environ.get("AWS_SECRET_ACCESS_KEY"),
                   os.environ.get("AWS_SESSION_TOKEN")):
        logs.register_secret(secret)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    _setup_logging(settings, args.log_level)
    if args.check:
        for key, value in settings.masked().items():
            print(f"{key} = {value}")
        print("configuration OK")
        return 0
    from gateway.daemon import amain

    return asyncio.run(amain(settings))


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.commands.jobs import check_config

    settings = _load(args)
    _setup_logging(settings, "WARNING")
    return check_config(settings)


def cmd_jobs(args: argparse.Namespace) -> int:
    from gateway.commands import jobs as commands

    fmt = "json" if args.json else "csv" if args.csv else "table"
    return commands.jobs(_load(args), status=args.status, to=args.to, sender=args.sender,
                    since=args.since, limit=args.limit, fmt=fmt)


def cmd_job_action(args: argparse.Namespace) -> int:
    from gateway.commands import jobs as commands

    action = {"job": commands.job, "resend": commands.resend, "cancel": commands.cancel,
              "report": commands.report}[args.command]
    return action(_load(args), args.job_id)


def sample_pdf(text: str = "faxgw test page") -> bytes:
    """A one-page Letter PDF with a line of text, built by hand (no PDF library needed)."""
    safe = text.replace("\\", "").replace("(", "").replace(")", "")
    stream = f"BT /F1 28 Tf 72 700 Td ({safe}) Tj ET".encode("latin-1", "replace")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        b" /Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    return pdf_from_objects(objects)


def _read_input(path: str, command: str) -> bytes | None:
    """A file named on the command line, or None after saying why it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        print(f"faxgw {command}: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return None


def _send_target(args: argparse.Namespace) -> tuple[str, int, str]:
    """Host, port and fax domain: --server / --domain, else SMTP_LISTEN / FAX_DOMAIN of the
    configuration (the gateway on this host), without requiring the rest of it to be valid."""
    from gateway.config import read_environment

    try:
        env = read_environment(args.config)
    except ConfigError:
        env = {}
    server = args.server or (env.get("SMTP_LISTEN") or "").strip() or defaults.SMTP_LISTEN
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    domain = args.domain or (env.get("FAX_DOMAIN") or "").strip() or defaults.FAX_DOMAIN
    if not port.isdigit():
        raise ValueError(f"{server!r} is not host:port")
    return host, int(port), domain


def cmd_send(args: argparse.Namespace) -> int:
    """A test client: mail files to the gateway, as a scanner or a person would."""
    import mimetypes
    import smtplib
    from email.message import EmailMessage

    try:
        host, port, domain = _send_target(args)
    except ValueError as exc:
        print(f"faxgw send: --server / SMTP_LISTEN: {exc}", file=sys.stderr)
        return 2
    if not (args.files or args.sample or args.body):
        print("faxgw send: give files to send, --sample or --body", file=sys.stderr)
        return 2
    msg = EmailMessage()
    msg["From"] = args.sender
    rcpts = [n if "@" in n else f"{n}@{domain}" for n in args.to]
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = args.subject
    msg.set_content(args.body or "Sent with faxgw send.\n")
    if args.sample:
        msg.add_attachment(sample_pdf(), maintype="application", subtype="pdf",
                           filename="faxgw-test-page.pdf")
    for name in args.files:
        path = Path(name)
        content = _read_input(name, "send")
        if content is None:
            return 66  # EX_NOINPUT
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        maintype, subtype = ctype.split("/", 1)
        msg.add_attachment(content, maintype=maintype, subtype=subtype, filename=path.name)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    refused: dict[str, tuple[int, bytes]] = {}
    try:
        with smtplib.SMTP(host, port, timeout=60) as client:
            client.ehlo()
            if args.starttls:
                client.starttls()
                client.ehlo()
            if args.user:
                import getpass

                client.login(args.user, getpass.getpass(f"Password for {args.user}: "))
            # Step by step rather than send_message: the reply to DATA names the jobs.
            code, text = client.mail(args.sender)
            if code != 250:
                raise smtplib.SMTPSenderRefused(code, text, args.sender)
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code not in (250, 251):
                    refused[rcpt] = (code, text)
            if len(refused) == len(rcpts):
                raise smtplib.SMTPRecipientsRefused(refused)
            code, text = client.data(msg.as_bytes(policy=msg.policy.clone(linesep="\r\n")))
    except smtplib.SMTPRecipientsRefused as exc:
        for rcpt, (code, text) in exc.recipients.items():
            print(f"refused {rcpt}: {code} {text.decode(errors='replace')}", file=sys.stderr)
        return 1
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error  # bytes from the server's reply; typeshed also allows str
        words = error.decode(errors="replace") if isinstance(error, bytes) else error
        print(f"refused: {exc.smtp_code} {words}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot talk to {where}: {exc}", file=sys.stderr)
        return 69
    for rcpt, (code, text) in refused.items():
        print(f"refused {rcpt}: {code} {text.decode(errors='replace')}", file=sys.stderr)
    print(f"sent to {', '.join(r for r in rcpts if r not in refused)}: "
          f"{code} {text.decode(errors='replace')}")
    return 0 if not refused else 1


def cmd_received(args: argparse.Namespace) -> int:
    import time

    from gateway.commands.received import received
    from gateway.outbound.actions import AdminError, parse_since

    settings = _load(args)
    try:
        since = parse_since(args.since, time.time()) if args.since else None
    except AdminError as exc:
        print(f"faxgw: {exc}", file=sys.stderr)
        return 2
    return received(settings, since=since, limit=args.limit, as_json=args.json)


def cmd_receive_sample(args: argparse.Namespace) -> int:

    from gateway.commands.received import receive_sample

    document = (_read_input(args.file, "receive-sample") if args.file
                else sample_pdf("faxgw received-fax sample"))
    if document is None:
        return 66  # EX_NOINPUT
    return receive_sample(_load(args), to=args.to, caller=args.caller, document=document)


def cmd_passwd(args: argparse.Namespace) -> int:
    """Add a user to the users file or change its password (scrypt hash)."""
    import getpass
    import os

    from gateway.users import UsersFileError, delete_user, passwd_command

    path = args.users_file or os.environ.get("USERS_FILE")
    if not path:
        print("faxgw passwd: give --users-file or set USERS_FILE", file=sys.stderr)
        return 2
    if args.delete:
        try:
            deleted = delete_user(path, args.username)
        except UsersFileError as exc:
            print(f"faxgw passwd: {exc}", file=sys.stderr)
            return 1
        if not deleted:
            print(f"faxgw passwd: no user {args.username} in {path}", file=sys.stderr)
            return 1
        print(f"user {args.username} deleted from {path}; their dashboard sessions end at "
              "their next request")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.username}: ")
        if getpass.getpass("Again: ") != password:
            print("faxgw passwd: the passwords differ", file=sys.stderr)
            return 1
    senders = None if args.senders is None else [s for s in args.senders.split(",") if s]
    try:
        print(passwd_command(path, args.username, password, from_number=args.from_number,
                             report_to=args.report_to, senders=senders, role=args.role))
    except (ValueError, UsersFileError) as exc:
        print(f"faxgw passwd: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faxgw", description="Email-to-fax gateway: mail a document to <number>@<FAX_DOMAIN>, "
        "get a fax sent through SignalWire and a report back.")
    parser.add_argument("--version", action="version", version=f"faxgw {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the gateway daemon (SMTP + HTTP listeners, worker)")
    run.add_argument("--config", metavar="PATH",
                     help="a .env file with the settings (default: $FAXGW_ENV_FILE, else ./.env)")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="override FAXGW_LOG_LEVEL")
    run.add_argument("--check", action="store_true",
                     help="validate the configuration, print it (secrets masked) and exit")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check-config", help="validate the configuration and try S3, "
                           "SignalWire, the relay and the certificate (exit 78 / 69 on failure)")
    check.set_defaults(func=cmd_check_config)

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--status", help="a job state (spooled, stored, submitting, submitted, "
                      "completed, given-up, reported), a fax status (delivered, busy, "
                      "no-answer, failed, canceled, ...) or 'active'")
    jobs.add_argument("--to", metavar="NUMBER", help="destination (or its last digits)")
    jobs.add_argument("--from", dest="sender", metavar="ADDR",
                      help="part of the sender's address")
    jobs.add_argument("--since", metavar="T", help="90m, 12h, 7d, 2w or a date (UTC)")
    jobs.add_argument("--limit", type=int, default=50)
    out = jobs.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON instead of a table")
    out.add_argument("--csv", action="store_true", help="CSV audit export")
    jobs.set_defaults(func=cmd_jobs)

    for name, text in (("job", "everything about one job: message, attempts, history"),
                       ("resend", "send a job's document to its number again (a new job)"),
                       ("cancel", "cancel a job: before sending, or at SignalWire while queued"),
                       ("report", "send a job's report again")):
        action = sub.add_parser(name, help=text)
        action.add_argument("job_id", metavar="ID", help="job id, a unique prefix (6+ "
                            "characters) or the SignalWire fax id")
        action.set_defaults(func=cmd_job_action)

    received = sub.add_parser("received", help="list received (inbound) faxes, newest first")
    received.add_argument("--since", metavar="T", help="90m, 12h, 7d, 2w")
    received.add_argument("--limit", type=int, default=50)
    received.add_argument("--json", action="store_true", help="JSON instead of a table")
    received.set_defaults(func=cmd_received)

    sample = sub.add_parser("receive-sample", help="sandbox: make the simulator send a fax "
                            "in to the running gateway, as SignalWire would")
    sample.add_argument("file", nargs="?", metavar="FILE", help="a PDF (or TIFF) to receive; "
                        "default: a generated page")
    sample.add_argument("--to", required=True, metavar="NUMBER",
                        help="the gateway's number it comes in on (routed by INBOUND_ROUTES)")
    sample.add_argument("--from", dest="caller", default="+12125550147", metavar="NUMBER",
                        help="the caller's number")
    sample.set_defaults(func=cmd_receive_sample)

    for p in (check, jobs, received, sample,
              *[sub.choices[n] for n in ("job", "resend", "cancel", "report")]):
        p.add_argument("--config", metavar="PATH", help="a .env file (default: "
                       "$FAXGW_ENV_FILE, else ./.env)")

    send = sub.add_parser("send", help="mail files to a gateway (a test client)")
    send.add_argument("files", nargs="*", metavar="FILE", help="documents to attach")
    send.add_argument("--sample", action="store_true",
                      help="attach a generated one-page test PDF")
    send.add_argument("--to", action="append", required=True, metavar="NUMBER",
                      help="fax number (or number@domain); repeat for several")
    send.add_argument("--server", metavar="HOST:PORT",
                      help="the gateway (default: SMTP_LISTEN of the configuration)")
    send.add_argument("--domain", help="fax domain (default: FAX_DOMAIN of the configuration)")
    send.add_argument("--config", metavar="PATH", help="a .env file to take SMTP_LISTEN and "
                      "FAX_DOMAIN from (default: $FAXGW_ENV_FILE, else ./.env)")
    send.add_argument("--from", dest="sender", default="faxgw-test@example.com",
                      metavar="ADDR", help="sender address (reports go here)")
    send.add_argument("--subject", default="faxgw test")
    send.add_argument("--body", help="message text (alone: a body-only mail, faxed as a page)")
    send.add_argument("--starttls", action="store_true", help="use STARTTLS")
    send.add_argument("--user", help="AUTH user (asks for the password)")
    send.set_defaults(func=cmd_send)

    passwd = sub.add_parser("passwd", help="add a user for SMTP AUTH, or change its password")
    passwd.add_argument("username")
    passwd.add_argument("--users-file", metavar="PATH", help="default: $USERS_FILE")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of standard input")
    passwd.add_argument("--from-number", metavar="E164",
                        help="this user's caller number (\"\" to clear)")
    passwd.add_argument("--report-to", metavar="ADDR",
                        help="send this user's reports here (\"\" to clear)")
    passwd.add_argument("--senders", metavar="LIST",
                        help="comma-separated sender addresses/patterns the user may use "
                             "(\"\" to clear)")
    role = passwd.add_mutually_exclusive_group()
    role.add_argument("--admin", dest="role", action="store_const", const="admin",
                      help="may log in to the web dashboard and act on jobs")
    role.add_argument("--viewer", dest="role", action="store_const", const="viewer",
                      help="may log in to the web dashboard, read-only")
    role.add_argument("--no-dashboard", dest="role", action="store_const", const="",
                      help="take the dashboard away from this user (mail only)")
    passwd.add_argument("--delete", action="store_true",
                        help="remove the user (mail and dashboard); their sessions end")
    passwd.set_defaults(func=cmd_passwd, role=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from gateway.store.health import DatabaseUnusable, damaged, is_damage

    try:
        code = int(args.func(args))
        sys.stdout.flush()  # here, where a reader gone away is caught, not at exit
        return code
    except BrokenPipeError:
        # `faxgw received --json | head`: the reader has what it wanted. Quiet from here on
        # (the interpreter's own flush of stdout at exit would fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except DatabaseUnusable as exc:
        print(f"faxgw: {exc}", file=sys.stderr)
        return EXIT_DATA
    except Exception as exc:  # noqa: BLE001 - only SQLite's "damaged file" is turned into words
        if not is_damage(exc):
            raise
        print(f"faxgw: {damaged(Path('DATA_DIR/faxgw.sqlite3'), exc)}", file=sys.stderr)
        return EXIT_DATA


if __name__ == "__main__":
    raise SystemExit(main())
