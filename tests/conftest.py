"""Shared fixtures: tiny generated images, a small digits folder, the CLI runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_backbone import write_tiny_hub

ROOT = Path(__file__).resolve().parents[1]
# one intra-op thread per pytest-xdist worker (two workers on two cores), two when run alone
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core this process may use (affinity and a cgroup quota, not the
    host's count), at most one per 3 GiB of memory (a worker and its CLI subprocesses import torch)."""
    from pipeline.threads import quota_cores, usable_cpus

    cores = min(len(usable_cpus()), quota_cores() or len(usable_cpus()))
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cores = min(cores, max(1, memory // (3 << 30)))
    except (OSError, ValueError, AttributeError):
        pass
    return max(1, cores)


@pytest.fixture(scope="session", autouse=True)
def _outputs_outside_the_repo(tmp_path_factory):
    """Default cache/head folders point into a temp dir, so tests never write into the checkout
    (CLI subprocesses inherit the environment)."""
    base = tmp_path_factory.mktemp("defaults")
    saved = {k: os.environ.get(k) for k in ("FEATCACHE_CACHE_DIR", "FEATCACHE_HEAD_DIR")}
    os.environ["FEATCACHE_CACHE_DIR"], os.environ["FEATCACHE_HEAD_DIR"] = str(base / "cache"), str(base / "heads")
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that changes torch's thread count in this worker must not change the next
    test's numbers (sums split across another count of threads round differently)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    yield
    if before is not None:
        torch.set_num_threads(before)


@pytest.fixture
def said():
    """What the library said through standard logging during the test (the ``pipeline`` logger's
    messages at INFO and above, in order): what a person at the terminal would have read."""
    import logging

    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("pipeline")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def make_image(path: Path, size=(48, 40), seed: int = 0, fmt: str | None = None, mode: str = "RGB") -> Path:
    """A deterministic noisy colour image (not blank, so embeddings differ per seed)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """ImageFolder tree: 3 classes x 4 images, mixed formats."""
    root = tmp_path / "imgs"
    exts = [".png", ".jpg", ".bmp", ".png"]
    for c, cls in enumerate(["cat", "dog", "eel"]):
        for i, ext in enumerate(exts):
            make_image(root / cls / f"{i}{ext}", seed=10 * c + i)
    return root


@pytest.fixture(scope="session")
def digits_small(tmp_path_factory) -> Path:
    from pipeline.demo import write_digits

    return write_digits(tmp_path_factory.mktemp("digits") / "digits", size=32, per_class=6)


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float | None = None,
            process: bool = False) -> subprocess.CompletedProcess:
    """``python cli.py ARGS``: exit code, stdout and stderr as users see them.

    In this process by default (``cli.main`` with its own argv, environment, working folder
    and stdio; a subprocess would spend most of a test importing torch again). A real
    process where one is what is tested, or what the call changes is read at import:
    ``process=True``, a ``timeout`` (a call that might hang), ``--debug`` (its stack dumps
    need real file descriptors), or an ``HF_*`` variable."""
    env = {k: str(v) for k, v in (env or {}).items()}
    if process or timeout is not None or "--debug" in args or any(k.startswith("HF_") for k in env):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "cli.py"), *args], check=False, capture_output=True, text=True, timeout=timeout or 600,
            env={**os.environ, **env}, cwd=ROOT,
        )
    else:
        proc = _run_in_process(list(args), env)
    if check and proc.returncode != 0:
        raise AssertionError(f"cli failed ({proc.returncode}): {proc.stderr}")
    return proc


def _run_in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``cli.main(args)`` with the state a fresh process would have, restored afterwards."""
    import io
    import traceback

    import cli

    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    saved_stdio = sys.stdout, sys.stderr
    torch = sys.modules.get("torch")
    saved_threads = torch.get_num_threads() if torch else None
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.argv = [str(ROOT / "cli.py"), *args]
    sys.stdout, sys.stderr = out, err
    cli._state.clear()
    cli._state.update(debug=False, json=False)
    try:
        cli.main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what would have been a traceback and exit 1
        traceback.print_exc(file=err)
        code = 1
    finally:
        from pipeline import logs

        logs.reset()  # the handlers cli.main installed: a later test gets logging as a fresh process has it
        sys.stdout, sys.stderr = saved_stdio
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        torch = sys.modules.get("torch")
        if torch is not None:
            torch.set_num_threads(saved_threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads())
    return subprocess.CompletedProcess([sys.executable, "cli.py", *args], code, out.getvalue(), err.getvalue())


def cli_json(*args: str, expect: int = 0) -> dict:
    proc = run_cli(*args, "--json")
    assert proc.returncode == expect, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stdout  # exactly one JSON object on stdout
    return json.loads(lines[0])


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder ``build(folder)`` fills once per test session, shared by the xdist workers: the
    first worker to need it builds it, a worker that needs it meanwhile waits (it would have
    spent as long building its own), later ones reuse it. The tests only read it."""
    import fcntl

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not done.exists():
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """All 1,797 digits through a seeded random resnet18: real embeddings a head must learn from.
    The costliest fixture, built once for all workers: ONNX Runtime where installed (57 s on
    one core here, eager 82 s; the same embeddings within 1e-6)."""
    import importlib.util

    from pipeline.demo import write_digits
    from pipeline.extract import run_extract

    def build(base: Path) -> None:
        engine = "onnxruntime" if importlib.util.find_spec("onnxruntime") else "eager"
        run_extract(write_digits(base / "digits", size=32), "resnet18", "none", base / "digits_resnet18.h5", batch_size=64, engine=engine)

    return built_once(tmp_path_factory, "digits_full", build) / "digits_resnet18.h5"




@pytest.fixture(scope="session")
def tiny_hub(tmp_path_factory) -> str:
    """``hub:DIR:tinybn``: a local torch.hub entry with BatchNorm and a 32-px input."""
    return write_tiny_hub(tmp_path_factory.mktemp("tinyhub"))


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory, tiny_hub) -> Path:
    """A logreg head on tinybn features of 10 digits per class (the fine-tune starting point)."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.heads.fit import fit_head

    base = tmp_path_factory.mktemp("tinyhead")
    data = write_digits(base / "digits", size=32, per_class=10)
    run_extract(data, tiny_hub, "none", base / "tiny.h5", batch_size=64, workers=0)
    return Path(fit_head(base / "tiny.h5", "logreg", base / "tiny.logreg.head.pt", plots=False).head_path)
