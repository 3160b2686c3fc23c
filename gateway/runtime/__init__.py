"""What the running daemon stands on, under every service: logging, Prometheus metrics, fault
injection, the instance lock, systemd notification, node heartbeats."""
