"""Threads for the cores that are free: a busy neighbour's core is seen and left to it."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline import threads


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two usable CPUs and affinity")
def test_a_cpu_kept_busy_by_another_process_is_seen_as_taken():
    cpu = max(os.sched_getaffinity(0))
    burner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile 1: pass"])
    try:
        time.sleep(0.5)
        assert cpu in threads.busy_cpus(0.3)
        assert threads.free_cores(0.3) <= len(os.sched_getaffinity(0)) - 1
    finally:
        burner.kill()
        burner.wait()


def test_the_user_s_thread_settings_win(monkeypatch):
    monkeypatch.setattr(threads, "free_cores", lambda window=0.1: 1)
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # "not imported yet": the count goes through the environment
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", threads.THREADS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    assert threads.use_free_cores() == 1 and os.environ["OMP_NUM_THREADS"] == "1" == os.environ["OPENBLAS_NUM_THREADS"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.use_free_cores() is None and os.environ["OMP_NUM_THREADS"] == "3"  # the user's count is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv(threads.THREADS_VARIABLE, "2")
    assert threads.use_free_cores() == 2
    monkeypatch.setenv(threads.THREADS_VARIABLE, "all")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads.use_free_cores() is None and "OMP_NUM_THREADS" not in os.environ


def test_openmp_spins_briefly_unless_the_user_chose(monkeypatch):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", threads.THREADS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    threads.prefer_short_spins()
    assert os.environ["GOMP_SPINCOUNT"] == threads.SPIN_COUNT
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.prefer_short_spins()
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv(threads.THREADS_VARIABLE, "all")
    threads.prefer_short_spins()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_a_command_started_beside_a_burner_uses_the_free_core(tmp_path):
    """End to end in a real process: what `_begin` chose is what torch runs with."""
    code = ("import os, sys; os.environ.pop('OMP_NUM_THREADS', None); sys.argv[0] = 'cli.py'\n"
            "from pipeline import threads; n = threads.use_free_cores(); import torch; print(n, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", threads.THREADS_VARIABLE)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=str(tmp_path),
                         ).stdout.split()
    chosen, used = int(out[0]), int(out[1])
    assert chosen == used >= 1
