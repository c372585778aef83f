import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from standin import StandIn  # noqa: E402

import z4j_agentd  # noqa: E402
from z4j_agentd import client as client_module  # noqa: E402


@pytest.fixture
def sock_path():
    # AF_UNIX paths are short (108 bytes): keep them out of pytest's long tmp paths.
    directory = tempfile.mkdtemp(prefix="z4jc-")
    yield os.path.join(directory, "agent.sock")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def standin(sock_path):
    server = StandIn(sock_path)
    yield server
    server.stop()


@pytest.fixture
def make_client(sock_path):
    made = []

    def make(**kwargs):
        kwargs.setdefault("socket_path", sock_path)
        c = z4j_agentd.Client(**kwargs)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close(timeout=0.5)


@pytest.fixture(autouse=True)
def fresh_default_client():
    """Each test starts without a default client, and closes any it made."""
    client_module._default = None
    yield
    default = client_module._default
    client_module._default = None
    if default is not None:
        default.close(timeout=0.5)
