"""Throughput benchmarks: every stage against the naive baseline measured in the same run."""
