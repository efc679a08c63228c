"""The suite's own set-up: how many pytest-xdist workers `-n auto` starts."""
from __future__ import annotations

import os

from conftest import pytest_xdist_auto_num_workers


def test_auto_workers_follow_usable_cores_and_memory(monkeypatch):
    """A 64-core host seen through a 2-core affinity gives 2 workers; 5 GiB of memory allows only 1."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": (24 << 30) // 4096}
    monkeypatch.setattr(os, "sysconf", lambda name: pages[name])
    assert pytest_xdist_auto_num_workers(None) == 2
    pages["SC_PHYS_PAGES"] = (5 << 30) // 4096
    assert pytest_xdist_auto_num_workers(None) == 1
