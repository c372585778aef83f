"""A throwaway redis-server on a Unix socket, for the unit tests that need
a real Redis (RQ, rq-scheduler, Dramatiq, Huey, TaskIQ's sources)."""

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager

import pytest


@contextmanager
def unix_redis(required: bool = False):
    """Starts redis-server on a socket in a temporary directory and yields
    the socket's path. Without redis-server the test is skipped, or, with
    `required`, fails saying so."""
    binary = shutil.which("redis-server")
    if binary is None:
        assert not required, "redis-server is not installed: these tests run against one"
        pytest.skip("redis-server is not installed")
    directory = tempfile.mkdtemp(prefix="z4jredis-")
    sock = os.path.join(directory, "redis.sock")
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)
