"""Rules parsed from settings, pure (no I/O): which senders and destinations are allowed, where
received faxes go."""
