"""Fixtures shared by the reliability tests; each module brings its own `served` (a Serve with its settings)."""

import pytest


@pytest.fixture(scope="module")
def client(served):
    """An HTTP client of the module's Serve."""
    with served.client() as c:
        yield c
