"""Shared inputs for the operator tests: heavy-tailed features and follow graphs (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from operators.graph import FollowGraph
from tests.helpers.operators_data import random_graph


@pytest.fixture
def rng():
    return np.random.default_rng(20261126)


@pytest.fixture
def graph(rng):
    """A 120-node heavy-tailed follow graph: (FollowGraph, src, dst, followers)."""
    n = 120
    src, dst = random_graph(rng, n, 600)
    return FollowGraph(src, dst, n), src, dst, np.bincount(src, minlength=n)
