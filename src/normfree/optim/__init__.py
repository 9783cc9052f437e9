"""Optimisation for normalizer-free training: AGC, MSR gradient projection, schedules, EMA and
parameter groups."""

__all__: list[str] = []
