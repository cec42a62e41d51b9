"""Tiny random-weight models for the CPU test suite (built from configs, no downloads)."""
