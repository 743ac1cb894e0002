"""Experiments: kernel benchmarks, results rows, timing, the command line."""
