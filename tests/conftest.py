"""Fixtures shared by the test modules."""
import os

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture
def task_identity():
    """Flower's Message reads the sender's identity from TaskIdentity (as coordinator/main.py sets it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, SUPERLINK_NODE_ID, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# Module fixtures that start a coordinator process, hivemind nodes or a gRPC server: every test using one is
# in the integration tier with the tests marked by hand (`pytest -m "not integration"` is the unit tier).
PROCESS_FIXTURES = {"auth_coordinator", "coord", "old_coordinator", "outcome", "pair", "servers"}


def pytest_collection_modifyitems(items):
    for item in items:
        # a `slow` scenario starts real processes too: the unit tier (-m "not integration") never runs one
        if PROCESS_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.integration)


def pytest_configure(config):
    # `fedswarm` processes the tests (and the sims they run) start are forked from a fork server that imported
    # torch and transformers once (sim/forkstart.py): real, separate processes, without each paying those imports.
    # Tests of the interpreter's own start (the entry point, the thread policy, a plain venv) run fresh ones.
    from fedswarm.sim.processes import FORK_ENV

    os.environ[FORK_ENV] = "1"
