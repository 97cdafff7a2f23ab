"""The prune reproduces, to the bit, what the code before the redesign gave (tests/golden_prune.py)."""

import json

import pytest

from golden_prune import GOLDEN_FILE, golden


@pytest.fixture(scope="module")
def computed():
    return golden()


EXPECTED = json.loads(GOLDEN_FILE.read_text())


def test_the_golden_set_covers_every_case(computed):
    assert sorted(computed) == sorted(EXPECTED)
    assert sum("files" in entry for entry in EXPECTED.values()) >= 60


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_prune_reproduces_the_golden_set(computed, name):
    assert computed[name] == EXPECTED[name]
