"""Fakes for tests and overhead measurements (never used by a shipped config)."""
