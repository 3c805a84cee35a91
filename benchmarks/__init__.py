"""Benchmark harness for Tokens Forge (`python -m benchmarks.run`, see benchmarks/README.md)."""
