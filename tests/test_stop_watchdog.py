"""SIGTERM and Ctrl-C end a command within seconds even when it is stuck inside C code, where
no Python signal handler can run (issue #28: a damaged file sent h5py into an endless loop
and `timeout -s TERM` never ended it). Real processes, real signals."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

# A command stuck in C with the GIL held: the second acquire of a native lock never returns,
# and no bytecode runs again in the main thread (as with h5py looping on damaged bytes).
HANGING_COMMAND = f'''
import ctypes, sys
sys.path.insert(0, {str(ROOT)!r})
sys.argv[0] = "cli.py"
import cli

@cli.command
def hang() -> int:
    """Hang inside C."""
    api = ctypes.pythonapi
    api.PyThread_allocate_lock.restype = ctypes.c_void_p
    api.PyThread_acquire_lock.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lock = api.PyThread_allocate_lock()
    api.PyThread_acquire_lock(lock, 1)
    print("hanging", flush=True)
    api.PyThread_acquire_lock(lock, 1)
    return 0

cli.main(sys.argv[1:])
'''


def _start_hanging(tmp_path: Path, grace: float, *args: str) -> subprocess.Popen:
    script = tmp_path / "hang.py"
    script.write_text(HANGING_COMMAND)
    # SIGINT as a terminal gives it: a suite started in the background (`cmd &`) passes SIGINT on ignored
    proc = subprocess.Popen([sys.executable, str(script), *args, "hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FEATCACHE_STOP_GRACE": str(grace)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "hanging"
    time.sleep(0.5)  # into the C call (a signal before it is handled by Python as usual)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_command_stuck_in_c_is_ended_within_the_grace_after_one_signal(tmp_path, signum):
    proc = _start_hanging(tmp_path, grace=1.5)
    t0 = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and 1.0 < time.monotonic() - t0 < 10
    assert "still running 1.5 s after SIGINT/SIGTERM" in err and err.count("\n") == 1


def test_a_second_signal_ends_it_at_once_and_debug_shows_where_it_hung(tmp_path):
    proc = _start_hanging(tmp_path, 60, "--debug")
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - t0 < 5
    assert "a second stop signal" in err and "in hang" in err  # faulthandler's stack of the main thread


def test_a_finished_command_leaves_no_watchdog_behind(tmp_path):
    """(A normal stop is not killed either: tests/test_crash.py stops an extract with SIGTERM
    and gets its clean exit 130 under the default grace.)"""
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "models", "--filter", "resnet18"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "resnet18" in out
    time.sleep(1.5)
    leftovers = subprocess.run(["pgrep", "-f", "--", f"-S -E -c .* {proc.pid} "], capture_output=True, text=True)
    assert leftovers.returncode == 1 and leftovers.stdout.strip() == ""  # 1: pgrep matched nothing


def test_the_cron_recipe_on_a_damaged_cache_ends_with_exit_5(tmp_path, digits_small, tiny_hub):
    """The README's cron line (`timeout -s TERM … run JOB --quiet --wait 600`) on a job whose
    cache was damaged: one line in the log and exit 5 — within seconds, not at the timeout."""
    job = tmp_path / "nightly.toml"
    job.write_text(f'name = "nightly"\ndata = [{str(digits_small)!r}]\ncache_dir = "cache"\nreport = false\n\n'
                   f'[[backbones]]\nmodel = {tiny_hub!r}\nweights = "none"\nworkers = 0\n\n[[heads]]\nclf = "logreg"\n')
    assert run_cli("run", str(job), "--quiet").returncode == 0
    (manifest,) = (tmp_path / "cache").glob("*.h5")
    data = bytearray(manifest.read_bytes())
    at = data.find(b'"seed": 0')
    data[at + 8] ^= 1
    manifest.write_bytes(bytes(data))
    (tmp_path / "digits_new").mkdir()  # (nothing else changes: the damage alone must stop the job)
    log = tmp_path / "nightly.log"
    t0 = time.monotonic()
    proc = subprocess.run(["timeout", "-s", "TERM", "120", sys.executable, str(ROOT / "cli.py"), "--log-file", str(log), "run", str(job),
                           "--quiet", "--wait", "600"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    assert time.monotonic() - t0 < 100
    errors = [line for line in log.read_text().splitlines() if "error" in line.lower()]
    assert errors and "manifest is damaged" in errors[-1] and "--repair" in errors[-1]
