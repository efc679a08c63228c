"""Signals: SIGTERM handled like Ctrl-C, so every long loop stops through one path (commit,
then exit 130); and a watchdog so that a stop never waits forever.

Python runs a signal handler only between two bytecodes of the main thread. A process stuck
inside one C call (a library looping on damaged bytes, a deadlocked native lock) never gets
there: SIGTERM and Ctrl-C are noted and never acted on, and a cron job under
``timeout -s TERM`` hangs for good. So the command line starts a tiny watchdog process that
hears about every SIGINT/SIGTERM at the C level (Python writes the signal number to a
*wakeup fd* the moment the signal arrives, whatever the interpreter is doing) and, if the
command is still alive ``grace`` seconds later (or at a second signal a second or more
after the first), ends it with SIGKILL — exit 137, after one line on stderr (and, with
``--debug``, every thread's stack). Everything committed before stays committed: commits
are atomic, so a kill loses only what a crash would.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

STOP_GRACE_S = 10.0  # how long a stop may take once asked for (FEATCACHE_STOP_GRACE overrides)

_WATCHDOG = r"""
import os, select, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)  # it must outlive the signals it watches for (sent to the whole group)
fd, pid, grace, dump = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
stops = (int(signal.SIGINT), int(signal.SIGTERM))
first = None
def stop(why):
    try:
        os.write(2, f"featcache: {why}; killing process {pid} (work committed before stays committed)\n".encode())
        if dump:
            os.kill(pid, signal.SIGUSR2)  # faulthandler prints every thread's stack
            time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    sys.exit(0)
while True:
    wait = 1.0 if first is None else max(0.0, min(1.0, first + grace - time.monotonic()))
    ready = select.select([fd], [], [], wait)[0]
    if os.getppid() != pid:
        sys.exit(0)
    if ready:
        data = os.read(fd, 256)
        if not data:
            sys.exit(0)  # the command ended: nothing holds the pipe any more
        now = time.monotonic()
        for signum in data:
            if signum in stops:
                if first is None:
                    first = now
                elif now - first >= 1.0:  # Ctrl-C reaches every process of the group at once: not a second signal
                    stop("a second stop signal")
    if first is not None and time.monotonic() >= first + grace:
        stop(f"still running {grace:g} s after SIGINT/SIGTERM (stuck inside a library call)")
"""


def stop_grace() -> float:
    try:
        return max(0.5, float(os.environ.get("FEATCACHE_STOP_GRACE", STOP_GRACE_S)))
    except ValueError:
        return STOP_GRACE_S


@contextmanager
def stop_watchdog(dump_stacks: bool = False) -> Iterator[None]:
    """Inside the block, SIGINT/SIGTERM end the process within :func:`stop_grace` seconds even
    when the interpreter is stuck in C (see the module docstring). Main thread only; a no-op
    elsewhere, or where a wakeup fd is already in use (an event loop owns it)."""
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or no pipes
        yield
        return
    if previous != -1:  # someone else's: leave it to them
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)
        yield
        return
    if dump_stacks:
        faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
    try:  # never waited for: it leaves on its own when the pipe closes or this process is gone
        subprocess.Popen([sys.executable, "-S", "-E", "-c", _WATCHDOG, str(r), str(os.getpid()), str(stop_grace()), "1" if dump_stacks else "0"],
                         pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    except OSError:  # cannot start a process: stops work as before, without the guarantee
        pass
    os.close(r)
    try:
        yield
    finally:
        signal.set_wakeup_fd(-1)
        os.close(w)  # the watchdog reads end-of-file and leaves
        if dump_stacks:
            faulthandler.unregister(signal.SIGUSR2)


@contextmanager
def signals_handled(handler, *signums: int) -> Iterator[None]:
    """``handler`` for ``signums`` inside the block, the previous handlers restored after
    (main thread only: elsewhere Python cannot set handlers, and the block runs as it is)."""
    try:
        previous = {s: signal.signal(s, handler) for s in signums}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


def sigterm_as_interrupt() -> AbstractContextManager[None]:
    """Turn SIGTERM into KeyboardInterrupt inside the block (main thread only)."""
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    return signals_handled(handler, signal.SIGTERM)
