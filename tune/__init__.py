"""Retraining with Ray Tune and the champion/challenger gate."""
