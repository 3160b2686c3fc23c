"""Benchmarks of the gateway against bare SMTP servers (see bench/README.md)."""
