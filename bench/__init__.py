"""Benchmarks: synthetic national data and the figures of docs/PERFORMANCE.md."""
