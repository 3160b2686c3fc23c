"""`faxgw` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from . import __version__
from .config import ConfigError, Settings, load_settings
from .constants import EXIT_CONFIG


def _load(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        print("faxgw: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # boto3/botocore debug lines would print presigned URLs and headers.
    # aiosmtpd's "mail.log" logs every command line at INFO, AUTH credentials included.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.getLevelName(level)))


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    _setup_logging(args.log_level or settings.log_level)
    if args.check:
        for key, value in settings.masked().items():
            print(f"{key} = {value}")
        print("configuration OK")
        return 0
    from .daemon import amain

    return asyncio.run(amain(settings))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faxgw", description="Email-to-fax gateway: mail a PDF to <number>@<FAX_DOMAIN>, "
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
