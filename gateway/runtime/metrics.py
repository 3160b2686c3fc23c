"""Prometheus metrics: counters bumped where things happen, gauges read from the store per scrape.

Each `Metrics` has its own `CollectorRegistry` (never the global one), so tests and several
gateways in one process do not share numbers. The store gauges come from a `StoreSnapshot` the
caller gathers off the event loop (`await store.run(collect_snapshot, store, now)`, two short
queries on the store's own thread) and hands to `render`, which only formats numbers: a scrape
never blocks the loop on SQLite.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from gateway.constants import FINAL_STATUSES
from gateway.jobs.outbound_states import ACTIVE_STATES, Job, State
from gateway.store.interfaces import Listings

log = logging.getLogger(__name__)

SCRAPE_STORE_TIMEOUT_S = 5.0

# The classic text format, which is what generate_latest writes (the library's newer default
# content type announces format 1.0.0, which older Prometheus servers do not expect).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Why a mail was refused; anything else is counted as "other" (labels stay a bounded set).
REFUSAL_REASONS = ("relay_denied", "bad_number", "too_many_recipients", "no_document",
                   "bad_document", "too_big", "too_many_pages", "temp_failure", "auth", "policy",
                   "rate_limited", "shutting_down", "too_many_connections", "timeout",
                   "protocol", "other")
# A job's outcome: a final SignalWire status, or "not_sent" when the gateway gave up.
OUTCOMES = (*sorted(FINAL_STATUSES), "not_sent", "other")
REPORT_RESULTS = ("sent", "no_address", "gave_up", "not_asked")  # not_asked: DSN NOTIFY
API_OPERATIONS = ("send", "fetch", "list", "cancel")

API_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
END_TO_END_BUCKETS_S = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
                        14400.0, 43200.0, 86400.0)


@dataclass(frozen=True)
class StoreSnapshot:
    """What the store gauges show, read in one go off the event loop."""

    counts_by_state: Mapping[str, int]
    oldest_active_created_at: float | None
    taken_at: float = field(default_factory=time.time)


def collect_snapshot(store: Listings, now: float) -> StoreSnapshot:
    """Run on the store's thread: `await store.run(collect_snapshot, store, clock())`."""
    return StoreSnapshot(store.counts_by_state(), store.oldest_active_created_at(), now)


class _StoreCollector:
    """Gauges from the snapshot `render` was given; nothing is read at collect time."""

    def __init__(self) -> None:
        self.snapshot: StoreSnapshot | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot
        up = GaugeMetricFamily("faxgw_store_up",
                               "1 if the job store answered for this scrape, else 0")
        up.add_metric([], 0.0 if snap is None else 1.0)
        yield up
        if snap is None:
            return
        jobs = GaugeMetricFamily("faxgw_jobs", "Jobs in the store by state", labels=["state"])
        for state in State:
            jobs.add_metric([state.value], float(snap.counts_by_state.get(state.value, 0)))
        yield jobs
        active = sum(snap.counts_by_state.get(s.value, 0) for s in ACTIVE_STATES)
        yield GaugeMetricFamily("faxgw_queue_depth",
                                "Active jobs (not yet reported): the gateway's backlog",
                                value=float(active))
        age = (0.0 if snap.oldest_active_created_at is None
               else max(0.0, snap.taken_at - snap.oldest_active_created_at))
        yield GaugeMetricFamily("faxgw_oldest_active_job_age_seconds",
                                "Age of the oldest job not yet reported (0 when none)",
                                value=age)


class _WakeupsCollector:
    """Whether other nodes' wake-ups reach this node, and how many it has heard."""

    def __init__(self, status: Callable[[], tuple[bool, int, str]]) -> None:
        self.status = status

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        listening, heard, _ = self.status()
        yield GaugeMetricFamily(
            "faxgw_wakeups_listening",
            "1 while this node hears the other nodes' wake-ups (LISTEN/NOTIFY); 0 while it "
            "finds their new work only by looking every few seconds", value=int(listening))
        yield CounterMetricFamily("faxgw_wakeups_heard",
                                  "Wake-ups from other nodes heard since start", value=heard)


class Metrics:
    """The gateway's metrics. Parts call the small methods below; `render` makes a scrape."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.mails_accepted = Counter("faxgw_mails_accepted", "Mails accepted (250 sent)",
                                      registry=r)
        self.jobs_accepted = Counter("faxgw_jobs_accepted",
                                     "Fax jobs created (one per fax number of a mail)",
                                     registry=r)
        self.mails_refused = Counter("faxgw_mails_refused",
                                     "Mails or recipients refused, by reason", ["reason"],
                                     registry=r)
        self.fax_outcomes = Counter("faxgw_fax_outcomes",
                                    "Jobs finished, by final fax status (not_sent: the gateway "
                                    "gave up or the operator canceled)", ["status"], registry=r)
        self.attempts = Counter("faxgw_fax_attempts", "Fax attempts sent to SignalWire",
                                registry=r)
        self.callback_signature_failures = Counter(
            "faxgw_callback_signature_failures",
            "Status callbacks refused for a missing or wrong signature", registry=r)
        self.api_errors = Counter("faxgw_signalwire_api_errors",
                                  "SignalWire API calls that failed, by operation and code "
                                  "(SignalWire code, http_<status>, network)",
                                  ["operation", "code"], registry=r)
        self.api_latency = Histogram("faxgw_signalwire_api_seconds",
                                     "SignalWire API call duration", ["operation"],
                                     buckets=API_BUCKETS_S, registry=r)
        self.end_to_end = Histogram("faxgw_fax_end_to_end_seconds",
                                    "From the mail's acceptance to the job's final outcome "
                                    "(its report), retries included",
                                    buckets=END_TO_END_BUCKETS_S, registry=r)
        self.reports = Counter("faxgw_reports", "Reports handled, by result", ["result"],
                               registry=r)
        # Which node this is: several gateways on one database scrape alike otherwise (the
        # store gauges are the shared queue's, the same on every node).
        self.node = Info("faxgw_node", "This gateway node: its NODE_ID and job store",
                         registry=r)
        for reason in REFUSAL_REASONS:  # every series exists from the start: rate() works
            self.mails_refused.labels(reason)
        for status in OUTCOMES:
            self.fax_outcomes.labels(status)
        for result in REPORT_RESULTS:
            self.reports.labels(result)
        for operation in API_OPERATIONS:
            self.api_latency.labels(operation)
        self._store = _StoreCollector()
        r.register(self._store)
        if process:
            ProcessCollector(registry=r)  # memory, CPU, fds; silent where /proc is hidden

    def watch_wakeups(self, status: Callable[[], tuple[bool, int, str]]) -> None:
        """Gauges of the wake-up listener (several gateways on PostgreSQL), read at each
        scrape from `status` (`Wakeups.status`)."""
        self.registry.register(_WakeupsCollector(status))

    # -- events -------------------------------------------------------------------------------

    def mail_accepted(self, jobs: int) -> None:
        self.mails_accepted.inc()
        self.jobs_accepted.inc(jobs)

    def mail_refused(self, reason: str) -> None:
        self.mails_refused.labels(reason if reason in REFUSAL_REASONS else "other").inc()

    def attempt_started(self) -> None:
        self.attempts.inc()

    def callback_refused(self) -> None:
        self.callback_signature_failures.inc()

    def report_done(self, result: str) -> None:
        self.reports.labels(result if result in REPORT_RESULTS else "sent").inc()

    def fax_finished(self, job: Job, now: float) -> None:
        """A job's outcome is final (call when its report is handled). A job reported before
        (its report sent again by the operator) is not counted twice."""
        if job.reported_at is not None:
            return
        if job.failure_reason or job.state is State.GIVEN_UP:
            status = "not_sent"
        elif job.fax_status in FINAL_STATUSES:
            status = job.fax_status
        else:
            status = "other"
        self.fax_outcomes.labels(status).inc()
        self.end_to_end.observe(max(0.0, now - job.created_at))

    def api_error(self, operation: str, exc: BaseException) -> None:
        self.api_errors.labels(operation, error_code_label(exc)).inc()

    @contextmanager
    def api_call(self, operation: str) -> Iterator[None]:
        """Time a SignalWire call; count it as an error if it raises."""
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.api_error(operation, exc)
            raise
        finally:
            self.api_latency.labels(operation).observe(time.perf_counter() - started)

    # -- exposition ---------------------------------------------------------------------------

    def render(self, snapshot: StoreSnapshot | None) -> bytes:
        """The scrape body. `snapshot` None: the store did not answer (faxgw_store_up 0)."""
        self._store.snapshot = snapshot
        try:
            return generate_latest(self.registry)
        finally:
            self._store.snapshot = None


def error_code_label(exc: BaseException) -> str:
    """A bounded label for a failed API call: SignalWire's code, else the HTTP status, else
    "network" (timeouts, refused connections); "internal" for anything that is not an API
    error at all."""
    code = getattr(exc, "code", None)
    status = getattr(exc, "status", None)
    if code is None and status is None and not hasattr(exc, "code"):
        return "internal"
    if isinstance(code, int) and 0 < code < 1_000_000:
        return str(code)
    if isinstance(status, int) and 100 <= status < 600:
        return f"http_{status}"
    return "network"


def authorized(authorization: str | None, token: str | None) -> bool:
    """Whether a scrape may see the metrics: always when no token is set, else only with
    `Authorization: Bearer <token>` (Prometheus: `authorization: {credentials: ...}`)."""
    if not token:
        return True
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                               token.encode())


def aiohttp_handler(metrics: Metrics, store: Listings, *, token: str | None = None,
                    clock: Callable[[], float] = time.time,
                    store_timeout_s: float = SCRAPE_STORE_TIMEOUT_S
                    ) -> Callable[[web.Request], Awaitable[web.Response]]:
    """GET /metrics for the gateway's aiohttp app: the store is read on its own thread, with a
    deadline; a store that does not answer gives faxgw_store_up 0, not a failed scrape."""

    async def handle(request: web.Request) -> web.Response:
        if not authorized(request.headers.get("Authorization"), token):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="faxgw"'})
        snapshot: StoreSnapshot | None
        try:
            snapshot = await asyncio.wait_for(store.run(collect_snapshot, store, clock()),
                                              store_timeout_s)
        except TimeoutError:
            log.warning("metrics: the job store did not answer within %.0f s", store_timeout_s)
            snapshot = None
        except Exception as exc:  # a request boundary: the scrape still answers
            log.warning("metrics: cannot read the job store: %s", exc)
            snapshot = None
        return web.Response(body=metrics.render(snapshot), headers={"Content-Type": CONTENT_TYPE})

    return handle
