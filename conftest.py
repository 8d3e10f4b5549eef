"""Names every doctest in fcb/ may use without importing them, and a per-user cache
directory of the test session's own (`XDG_CACHE_HOME`): the `fcb` commands the tests run keep
compiled programs there, never in the machine's cache that earlier runs filled."""

import atexit
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb

_CACHE_HOME = tempfile.mkdtemp(prefix="fcb-tests-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, True)


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(fcb=fcb, jax=jax, jnp=jnp, np=np, json=json)
