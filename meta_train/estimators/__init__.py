"""Gradient estimators (antithetic truncated ES, PES) over truncated unrolls, and
truncation schedules."""
