"""Benchmarks: each runs as `python benchmarks/<name>.py` or `python -m benchmarks.<name>` from the
repo root and prints what it measured (several record it in docs/benchmarks.md with `--write`)."""
