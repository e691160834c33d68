"""Schedules and budgets as pure functions of tokens seen (no torch state, no deepspeed)."""
