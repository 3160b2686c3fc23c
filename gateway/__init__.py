"""faxgw: an email-to-fax gateway daemon (SMTP in, SignalWire fax out, report mail back)."""

__version__ = "0.1.0"
