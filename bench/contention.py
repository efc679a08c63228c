"""A busy neighbour: each command quiet, beside a one-core burner and beside a two-core burner,
side by side in one run on this machine (issue #30).

    python bench/contention.py            # the demo digits, a 20,000 x 64 cache, 256 JPEGs, one fine-tune epoch
    python bench/contention.py --quick    # smaller inputs, quiet and one burner only (CI: the bench runs)
    python bench/contention.py --json

A burner is `python3 -c 'while 1: pass'`: one process per core it takes. Every command runs
in its own process (as a cron job or a user at a terminal runs it), timed wall clock, best
of ``--repeat``. Commands: fit-head logreg on the demo cache (1,797 x 512) and on a
20,000 x 64 cache; extract of 256 JPEGs (resnet18, engine eager); one fine-tune epoch on the
digits (resnet18, last block); and scikit-learn's LogisticRegressionCV on the 20,000 x 64 rows
as the reference. Goal: burner / quiet <= 2.0 for every command (a burner on one of two cores
leaves one core; on both, half of each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import hard_features, make_jpegs  # noqa: E402

from pipeline.backbones.hardware import cpu_summary  # noqa: E402

SKLEARN_REFERENCE = """
import sys, time, numpy as np
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
sys.path.insert(0, {root!r})
from pipeline import load_cache
c = load_cache({cache!r})
make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=3, max_iter=1000)).fit(c.embeddings, c.labels)
"""


# the runs choose their own threads: no thread settings inherited from the shell running the bench
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
                                                               "GOMP_SPINCOUNT", "FEATCACHE_THREADS")}
# (label, burner processes, environment): featcache as shipped, and with the runtimes' own defaults
# (FEATCACHE_THREADS=all: every core, spinning waits), as it ran before it chose threads itself
CONDITIONS = [("quiet", 0, {}), ("one-core burner", 1, {}), ("two-core burner", 2, {}),
              ("defaults quiet", 0, {"FEATCACHE_THREADS": "all"}), ("defaults one-core burner", 1, {"FEATCACHE_THREADS": "all"})]


@contextmanager
def burners(n: int) -> Iterator[None]:
    procs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    time.sleep(0.5 if n else 0)  # let them take their cores
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def timed(cmd: list[str], repeat: int, work: Path, env: dict[str, str]) -> float:
    """Best wall time of ``cmd``; ``{fresh}`` in it becomes a new path each run (an extract into a new cache)."""
    best = float("inf")
    for _ in range(repeat):
        fresh = work / f"fresh-{time.monotonic_ns()}.h5"
        t0 = time.perf_counter()
        proc = subprocess.run([c.replace("{fresh}", str(fresh)) for c in cmd], cwd=ROOT, capture_output=True, text=True, check=False,
                              env={**CLEAN_ENV, **env})
        if proc.returncode not in (0, 3):
            raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr[-1500:]}")
        best = min(best, time.perf_counter() - t0)
    return best


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args, "--quiet"]


def prepare(work: Path, quick: bool) -> dict[str, list[str]]:
    """The commands, their inputs built once (outside the timings)."""
    import numpy as np

    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.heads import fit_head
    from pipeline.store import CacheWriter, new_cache_meta

    digits = write_digits(work / "digits", size=32, per_class=None if not quick else 15)
    demo = work / "demo.h5"
    run_extract(digits, "resnet18", "none", demo, workers=0)
    head = Path(fit_head(demo, "logreg", work / "demo.head.pt", plots=False).head_path)
    rows = 4000 if quick else 20_000
    X, y = hard_features(rows, 64, 10, seed=0)
    wide = work / "wide.h5"
    w = CacheWriter(wide, new_cache_meta("synthetic", 64, [f"c{i}" for i in range(10)], weights="none", seed=0, data_root="/synthetic"))
    w.add_columns([f"c{c}/{i:06d}.jpg" for i, c in enumerate(y)], X.astype(np.float32), labels=y)
    w.commit()
    w.close()
    jpegs = make_jpegs(work / "jpegs", 32 if quick else 256)
    reference = work / "sklearn_reference.py"
    reference.write_text(SKLEARN_REFERENCE.format(root=str(ROOT), cache=str(wide)))
    return {
        "fit-head logreg, demo digits": cli("fit-head", str(demo), "--clf", "logreg", "--out", str(work / "h1.pt")),
        f"fit-head logreg, {rows:,} x 64": cli("fit-head", str(wide), "--clf", "logreg", "--out", str(work / "h2.pt")),
        f"extract, {len(list(jpegs.rglob('*.jpg')))} JPEGs (resnet18)": cli("extract", str(jpegs), "-m", "resnet18", "-w", "none", "--engine", "eager",
                                                                         "--out", "{fresh}"),
        "finetune, 1 epoch (resnet18, digits)": cli("finetune", str(head), "--epochs", "1", "--out", str(work / "m.pt"), "--force"),
        f"sklearn LogisticRegressionCV, {rows:,} x 64 (reference)": [sys.executable, str(reference)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeat", type=int, default=None)
    args = ap.parse_args()
    repeat = args.repeat or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result: dict = {"cores": cores, "cpu": cpu_summary().get("capability", ""), "commands": {}}
    with tempfile.TemporaryDirectory(prefix="featcache-contention-") as tmp:
        commands = prepare(Path(tmp), args.quick)
        for name, cmd in commands.items():
            row = {}
            for label, n, env in CONDITIONS[:2] if args.quick else CONDITIONS:  # --quick (CI): proves it runs, quiet and one burner
                with burners(n):
                    row[label] = timed(cmd, repeat, Path(tmp), env)
            nan = float("nan")
            row["ratio one-core"] = row["one-core burner"] / row["quiet"]
            row["ratio two-core"] = row.get("two-core burner", nan) / row["quiet"]
            row["defaults ratio one-core"] = row.get("defaults one-core burner", nan) / row.get("defaults quiet", nan)
            row["quiet vs defaults"] = row["quiet"] / row.get("defaults quiet", nan)
            result["commands"][name] = row
    if args.json:
        print(json.dumps(result))
        return
    print(f"{cores} cores, {result['cpu']}; wall seconds, best of {repeat}; burner / quiet (goal <= 2.0); "
          "'defaults' = FEATCACHE_THREADS=all (torch's and OpenMP's own thread count and spin count, as before)")
    print(f"{'command':<56} {'quiet':>6} {'1 burner':>8} {'2 burners':>9} {'ratio 1':>7} {'ratio 2':>7} | {'defaults':>8} {'1 burner':>8} {'ratio 1':>7} | quiet/defaults")
    for name, r in result["commands"].items():
        g = lambda key: r.get(key, float("nan"))  # noqa: E731 - --quick measures quiet and one burner only
        print(f"{name:<56} {r['quiet']:6.2f} {r['one-core burner']:8.2f} {g('two-core burner'):9.2f} {r['ratio one-core']:7.2f} {r['ratio two-core']:7.2f} | "
              f"{g('defaults quiet'):8.2f} {g('defaults one-core burner'):8.2f} {r['defaults ratio one-core']:7.2f} | {r['quiet vs defaults']:.2f}")


if __name__ == "__main__":
    main()
