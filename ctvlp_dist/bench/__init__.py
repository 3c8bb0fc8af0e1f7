"""Benchmarks behind `ctvlp bench <what>`; each writes JSON into benchmarks/results/."""
