"""Inbound counters, registered on the gateway's own registry (`Metrics.registry`), so they
appear on /metrics next to the outbound ones without changes to runtime/metrics.py."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

OUTCOMES = ("received", "failed", "noise", "canceled", "unrouted", "blocked", "media_refused",
            "gave_up")
MAIL_RESULTS = ("sent", "retry")


class InboundMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.faxes = Counter("faxgw_inbound_faxes",
                             "Inbound fax calls, each counted once by its final outcome when "
                             "it is finished (received, failed, noise: a voice call on the fax "
                             "line, canceled, unrouted/blocked: rejected, media_refused, "
                             "gave_up)", ["outcome"], registry=r)
        self.mails = Counter("faxgw_inbound_mails", "Mails of received faxes, by result",
                             ["result"], registry=r)
        self.signature_failures = Counter(
            "faxgw_inbound_signature_failures",
            "Inbound webhooks and action callbacks refused for their signature", registry=r)
        self.media_deleted = Counter("faxgw_inbound_media_deleted",
                                     "Received documents deleted at SignalWire after delivery",
                                     registry=r)
        for outcome in OUTCOMES:
            self.faxes.labels(outcome)
        for result in MAIL_RESULTS:
            self.mails.labels(result)
