"""Fixtures the reliability tests share: a throwaway PostgreSQL, and a store URL on SQLite and on it.

Each module brings its own `served` (tests/support/serving.py); tests/conftest.py gives it a `client`.
"""

import pytest

from tests.support.postgres import postgres_server


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL (Debian's package) on a free port, unix socket in a temp dir."""
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'rayloop.db'}"
    return request.getfixturevalue("postgres_url")
