"""Benchmarks behind `vmeanba bench-*`: medians over repeats, saved as JSON with machine info."""
