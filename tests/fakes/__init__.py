"""Fake platform servers for the adapter tests (real client libraries talk to them)."""
