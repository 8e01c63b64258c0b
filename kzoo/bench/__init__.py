"""Benchmarks behind ``kzoo bench``: side-by-side medians, JSON results and PNG plots."""
