"""Cluster: settings, the rayloop CLI, local Ray and background services."""
