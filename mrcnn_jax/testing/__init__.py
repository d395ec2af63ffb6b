"""Helpers for tests and benchmarks that need a reference implementation (torch optional)."""
