"""Where the tests find the repository they test."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
