"""Reliability and security: contention, hostile input, access, erasure, faults and restarts.

Their helpers live in tests/support/ (figures.py, faults.py, serving.py), their shared fixtures in conftest.py.
"""
