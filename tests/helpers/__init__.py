"""Helpers that several test modules share, by topic; a test module imports them from here,
never from another test module. Fixtures defined here are imported by the modules that use
them (`from .helpers.dashboard import browser`); the general ones live in tests/conftest.py."""
