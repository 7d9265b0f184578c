"""Benchmarks of the loop engine and its HTTP API (see bench/README.md)."""
