"""Fixture: the toy dataset written once per test session."""

import pytest

from toydata import write_toy_dataset


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"))
