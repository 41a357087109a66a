import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fastbn  # noqa: E402

# Every backend that works here; the suite runs its backend-generic tests on each.
BACKENDS = fastbn.backends.available()


def pytest_report_header(config):
    return f"fastbn backends under test: {', '.join(BACKENDS)}"


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test once per working backend, with that backend selected."""
    with fastbn.backends.use(request.param) as selected:
        yield selected


@pytest.fixture(autouse=True)
def fresh_graph():
    """Each test starts with an empty default graph."""
    fastbn.reset_default_graph()
    yield fastbn.get_default_graph()
