"""Faxes in, mail out: SignalWire's inbound fax webhook, delivery by mail, reconciliation."""
