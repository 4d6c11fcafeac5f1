"""Cluster: settings, the environment Ray needs, connecting to Ray, the local head and background services."""
