"""Names every doctest in fcb/ may use without importing them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fcb


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace.update(fcb=fcb, jax=jax, jnp=jnp, np=np, json=json)
