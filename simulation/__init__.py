"""Simulated traffic: distribution shifts, `rayloop simulate`, and the whole-loop scenario."""
