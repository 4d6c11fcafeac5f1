"""Programs the tests run outside the project's venv."""
