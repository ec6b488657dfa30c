"""Fixtures shared by the test modules (opt in with ``pytest.mark.usefixtures``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small tensors: intra-op threads only add wake-up latency (10x slower on a busy 2-core
    machine), so a module runs single-threaded and the setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def native_cpu_convs() -> Iterator[None]:
    """oneDNN float32 convs are 2-40x slower than ATen's on some CPUs (AMD EPYC here)."""
    prev = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = prev
