"""A SignalWire fax API simulator: the gateway's sandbox mode and the tests' fax provider.

It speaks the Compatibility API's fax endpoints over real HTTP and behaves like SignalWire
where the gateway depends on it (signalwire-fax-facts.md): form-encoded sends, Basic auth,
the error body shape, a real GET of MediaUrl with no redirects followed, PDF only, a signed
form-encoded status callback with 3 attempts and short timeouts. The fax outcome is chosen
by the destination number so every path of the gateway can be driven without a phone line:

    ...0000 busy   ...0001 no-answer   ...0002 failed "The call dropped prematurely"
    ...0003 failed "Far end cannot receive at the resolution of the image" unless
            Quality=standard   ...0004 failed "Timed out waiting for initial communication"
    anything else: delivered

`SimulatorState` (``app[SIM_STATE]``) records what happened and carries fault knobs.
Routes live under ``base_path`` so the simulator can run alone or inside the gateway's app
(`install_simulator`). Handlers close over their state rather than reading ``request.app``,
so mounting with ``add_subapp`` works as well.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

from aiohttp import web

from gateway.constants import API_PATH
from gateway.sandbox.fax_api import FaxApi
from gateway.sandbox.fax_engine import SimulatorState

log = logging.getLogger(__name__)


def _normalise_base_path(base_path: str) -> str:
    base = base_path.strip().rstrip("/")
    if base and not base.startswith("/"):
        base = "/" + base
    return base


def install_simulator(app: web.Application, *, project_id: str, api_token: str,
                      signing_key: str, callback_delay_s: float = 0.2, base_path: str = "",
                      callback_retry_delay_s: float = 0.5) -> SimulatorState:
    """Add the simulator's routes under ``base_path`` to an existing (unfrozen) app.

    The state is stored at ``app[SIM_STATE]`` and returned; its HTTP client opens on the
    app's startup and its fax tasks are cancelled on the app's cleanup.
    """
    state = SimulatorState(project_id=project_id, signing_key=signing_key,
                           callback_delay_s=callback_delay_s,
                           callback_retry_delay_s=callback_retry_delay_s)
    api = FaxApi(state, api_token)
    faxes = f"{_normalise_base_path(base_path)}{API_PATH}/Accounts/{{project}}/Faxes"
    app.router.add_post(faxes, api.create)
    app.router.add_get(faxes, api.list_faxes)
    app.router.add_get(faxes + "/{sid}", api.fetch)
    app.router.add_post(faxes + "/{sid}", api.update)
    app.router.add_delete(faxes + "/{sid}", api.delete)
    app.router.add_get(faxes + "/{sid}/Media/{media_sid}", api.media)
    app.router.add_delete(faxes + "/{sid}/Media/{media_sid}", api.media)
    from gateway.sandbox.inbound_faxes import install_inbound

    install_inbound(app, state, api, _normalise_base_path(base_path))
    app[SIM_STATE] = state
    app.on_startup.append(state._on_startup)
    app.on_cleanup.append(state._on_cleanup)
    return state


def create_simulator_app(*, project_id: str, api_token: str, signing_key: str,
                         callback_delay_s: float = 0.2, base_path: str = "",
                         callback_retry_delay_s: float = 0.5) -> web.Application:
    """A standalone simulator app; its state is ``app[SIM_STATE]``."""
    app = web.Application()
    install_simulator(app, project_id=project_id, api_token=api_token,
                      signing_key=signing_key, callback_delay_s=callback_delay_s,
                      base_path=base_path, callback_retry_delay_s=callback_retry_delay_s)
    return app


SIM_STATE: Final = web.AppKey("faxgw_simulator_state", SimulatorState)


def _bound_url(runner: web.AppRunner, base_path: str) -> str:
    host, port = runner.addresses[0][:2]
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{_normalise_base_path(base_path)}"


async def run_standalone(host: str = "127.0.0.1", port: int = 0, *,
                         on_ready: Callable[[str], None] | None = None,
                         stop: asyncio.Event | None = None, **kwargs: Any) -> None:
    """Serve the simulator until ``stop`` is set or the task is cancelled.

    ``on_ready`` gets the base URL (the equivalent of ``https://SPACE.signalwire.com``, plus
    ``base_path``) once the socket is bound; by default it is printed on one line of stdout.
    ``kwargs`` go to `create_simulator_app`.
    """
    app = create_simulator_app(**kwargs)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        url = _bound_url(runner, kwargs.get("base_path", ""))
        log.info("simulator listening on %s", url)
        if on_ready is None:
            print(url, flush=True)
        else:
            on_ready(url)
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.sandbox.simulator",
        description="SignalWire fax API simulator; prints its base URL once listening.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--project-id", default=os.environ.get("SIM_PROJECT_ID"))
    parser.add_argument("--api-token", default=os.environ.get("SIM_API_TOKEN"),
                        help="or SIM_API_TOKEN (keeps it out of the process list)")
    parser.add_argument("--signing-key", default=os.environ.get("SIM_SIGNING_KEY"),
                        help="or SIM_SIGNING_KEY")
    parser.add_argument("--callback-delay-s", type=float, default=0.2)
    parser.add_argument("--callback-retry-delay-s", type=float, default=0.5)
    parser.add_argument("--base-path", default="")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    missing = [name for name in ("project_id", "api_token", "signing_key")
               if not getattr(args, name)]
    if missing:
        parser.error("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return args


async def _amain(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await run_standalone(args.host, args.port, stop=stop, project_id=args.project_id,
                         api_token=args.api_token, signing_key=args.signing_key,
                         callback_delay_s=args.callback_delay_s,
                         callback_retry_delay_s=args.callback_retry_delay_s,
                         base_path=args.base_path)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_amain(args))


if __name__ == "__main__":
    main()
