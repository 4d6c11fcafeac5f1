"""Drift detection with Evidently, triggers and metrics."""
