"""Measuring Murmur: scoring, the benchmark, attention analysis, DuoAttention calibration."""
