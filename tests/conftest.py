"""Fixtures shared by the unit tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module on one thread: its models are tiny, so one thread runs them as fast as several, and other
    programs on the machine slow it down far less (threads that wait for each other stall when the cores are busy).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
