"""Benchmarks (not tests): each script prints a table and writes JSON under bench/results/."""
