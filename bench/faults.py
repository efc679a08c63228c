"""Fault injection: random kill -9 of extract, fit-head and finetune, full disks of random
sizes, then the next run; and single bit flips in a cache's part and manifest; one table of
what happened.

    python bench/faults.py            # 12 kills per command, 8 full disks, every 7th byte of a part and every 3rd of the manifest flipped
    python bench/faults.py --quick    # 3 kills, 3 disks, 120 flips sampled from those (CI: proves the promises hold and the script runs)

What is checked after every fault (and counted in the table):
- committed rows lost: rows the cache held right after the fault that the next (completing)
  run does not hold with the same embedding — must be 0;
- crashes: any exit other than the documented codes (0, 3, 6; -9 for our own kill), a
  cache, head or checkpoint that no longer loads, or a run after the fault that fails — must be 0.
- bit flips: one bit of one byte of a part (every 7th byte) or of the manifest (every 3rd),
  each followed by `load_cache`, `status --no-verify`, `fit-head` and `extract --repair` with
  30 s for all four: every answer is either exit 5 (damage named) or exactly the reference's
  (labels, paths, embeddings, provenance); a different answer without an error is a *silent
  wrong answer*, no answer within 30 s a *hang* (then SIGTERM, which must end it), exit 1 a
  *crash*; after the repair the cache must hold the reference rows. Goal: 0, 0, 0, all repaired.
The backbone is a tiny BatchNorm conv net (a local torch.hub entry) so a trial takes seconds;
the storage, locking and resume code under test is the same for every backbone. Full disks
are small tmpfs mounts (root only; skipped, and said so, elsewhere).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCUMENTED = {0, 3, 6, -signal.SIGKILL}


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), *args]


def run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def kill_after(args: list[str], seconds: float) -> int:
    """Start ``args``, SIGKILL it after ``seconds`` (if still running); its exit code."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def cache_rows(path: Path) -> dict[str, bytes] | None:
    """path -> embedding bytes of every committed row; None when the cache does not load."""
    from pipeline import load_cache
    from pipeline.errors import FeatcacheError

    if not path.exists():
        return {}
    try:
        c = load_cache(path)
    except FeatcacheError:
        return None
    return {p: e.tobytes() for p, e in zip(c.paths, c.embeddings)}


class Table:
    def __init__(self) -> None:
        self.rows: dict[str, Counter] = {}
        self.codes: dict[str, Counter] = {}

    def add(self, kind: str, *, killed: bool = False, lost: int = 0, crash: bool = False, codes: tuple[int, ...] = ()) -> None:
        row = self.rows.setdefault(kind, Counter())
        row["runs"] += 1
        row["kills"] += killed
        row["lost"] += lost
        row["crashes"] += crash
        self.codes.setdefault(kind, Counter()).update(codes)

    def print(self) -> None:
        print(f"{'fault':<24} {'runs':>5} {'kills':>6} {'committed rows lost':>20} {'crashes':>8}  exit codes seen")
        for kind, row in self.rows.items():
            codes = ", ".join(f"{c}×{n}" for c, n in sorted(self.codes[kind].items()))
            print(f"{kind:<24} {row['runs']:>5} {row['kills']:>6} {row['lost']:>20} {row['crashes']:>8}  {codes}")

    @property
    def bad(self) -> int:
        return sum(r["lost"] + r["crashes"] for r in self.rows.values())


def extract_kills(table: Table, data: Path, hub: str, work: Path, trials: int, rng: random.Random) -> None:
    args = ["extract", str(data), "-m", hub, "-w", "none", "--batch-size", "8", "--commit-every", "16", "--workers", "0"]
    t0 = time.perf_counter()
    reference_run = run(cli(*args, "--out", str(work / "reference.h5")))
    duration = time.perf_counter() - t0
    reference = cache_rows(work / "reference.h5")
    assert reference_run.returncode == 0 and reference, reference_run.stderr
    for i in range(trials):
        out = work / f"killed-{i}.h5"
        code = kill_after(cli(*args, "--out", str(out)), rng.uniform(0.3, 1.0) * duration)
        committed = cache_rows(out)
        after = run(cli(*args, "--out", str(out)))
        final = cache_rows(out)
        crash = code not in DOCUMENTED or committed is None or final is None or after.returncode != 0 or final != reference
        lost = sum(1 for p, e in (committed or {}).items() if (final or {}).get(p) != e)
        table.add("extract kill -9", killed=code == -signal.SIGKILL, lost=lost, crash=crash, codes=(code, after.returncode))


def fit_head_kills(table: Table, cache: Path, work: Path, trials: int, rng: random.Random) -> None:
    from pipeline import load_head
    from pipeline.errors import FeatcacheError

    head = work / "h.pt"
    args = ["fit-head", str(cache), "--clf", "mlp", "--epochs", "30", "--out", str(head)]
    t0 = time.perf_counter()
    assert run(cli(*args)).returncode == 0
    duration = time.perf_counter() - t0
    for _ in range(trials):
        before = head.read_bytes()
        code = kill_after(cli(*args, "--seed", str(rng.randrange(1000))), rng.uniform(0.3, 1.1) * duration)
        try:
            load_head(head)
            intact = True
        except FeatcacheError:
            intact = False
        after = run(cli(*args))  # the next writer also sweeps what the killed one left
        swept = not [p.name for p in work.iterdir() if ".tmp-" in p.name and p.name.startswith(".h.")]
        crash = code not in DOCUMENTED or not intact or after.returncode != 0 or not swept
        table.add("fit-head kill -9", killed=code == -signal.SIGKILL, lost=0 if intact or head.read_bytes() == before else 1, crash=crash,
                  codes=(code, after.returncode))


def finetune_kills(table: Table, head: Path, work: Path, trials: int, rng: random.Random) -> None:
    import torch

    model = work / "m.pt"
    args = ["finetune", str(head), "--out", str(model), "--epochs", "3", "--batch-size", "8", "--workers", "0", "--trust-hub"]  # its head is on a hub: entry
    t0 = time.perf_counter()
    assert run(cli(*args, "--force")).returncode == 0
    duration = time.perf_counter() - t0
    for _ in range(trials):
        code = kill_after(cli(*args, "--force"), rng.uniform(0.3, 1.0) * duration)
        ckpt = Path(f"{model}.ckpt")
        try:
            epoch = int(torch.load(ckpt, weights_only=True)["epoch"]) if ckpt.exists() else 0
            readable = True
        except Exception:  # noqa: BLE001 - any failure to read it is what this counts
            epoch, readable = -1, False
        after = run(cli(*args, "--resume"))
        crash = code not in DOCUMENTED or not readable or after.returncode != 0
        table.add("finetune kill -9", killed=code == -signal.SIGKILL, lost=0 if epoch >= 0 else 1, crash=crash, codes=(code, after.returncode))


def disk_full(table: Table, data: Path, hub: str, work: Path, trials: int, rng: random.Random) -> bool:
    mount = work / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)]).returncode:
        print("disk full: skipped (mounting a small tmpfs needs root)")
        return False
    try:
        args = ["extract", str(data), "-m", hub, "-w", "none", "--batch-size", "8", "--commit-every", "16", "--workers", "0"]
        unchecked = "import pipeline.store.atomic as a; a.free_bytes = lambda folder: 1 << 62; "
        for i in range(trials):
            filler, out = mount / "filler", mount / f"c{i}.h5"
            bypass = i % 2 == 1  # every other trial: the free-space check passes, so HDF5/torch really hit ENOSPC
            free = rng.randint(2_000, 40_000) if bypass else rng.randint(2_000, 1_500_000)
            filler.unlink(missing_ok=True)
            avail = shutil.disk_usage(mount).free
            if avail > free:
                subprocess.run(["fallocate", "-l", str(avail - free), str(filler)], check=True)
            code_text = (unchecked if bypass else "") + f"import sys; sys.argv[0] = 'cli.py'; import cli; cli.main({[*args, '--out', str(out)]!r})"
            full = run([sys.executable, "-c", code_text])
            committed = cache_rows(out)
            filler.unlink(missing_ok=True)
            after = run(cli(*args, "--out", str(out)))
            final = cache_rows(out)
            lost = sum(1 for p, e in (committed or {}).items() if (final or {}).get(p) != e)
            one_line = full.returncode != 6 or sum(line.startswith("error:") for line in full.stderr.splitlines()) == 1
            crash = full.returncode not in DOCUMENTED or committed is None or after.returncode != 0 or not one_line or "Traceback" in full.stderr
            table.add("disk full" + (" (inside HDF5)" if bypass else " (checked)"), lost=lost, crash=crash, codes=(full.returncode,))
            for p in mount.glob(f"c{i}.h5*"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        run(["umount", "-l", str(mount)])
    return True


FLIP_BUDGET_S = 30.0  # all four commands of one flip (the issue's `timeout -s TERM 30`)


def flip_plan(reference: Path, part_stride: int, manifest_stride: int, sample: int | None, rng: random.Random) -> list[dict]:
    """One flip per chosen byte: (file, offset, bit); ``sample`` draws that many from the sweep."""
    from pipeline.store import parts_dir_for

    (part,) = sorted(parts_dir_for(reference).glob("part-*.h5"))
    plan = [{"file": f"parts/{part.name}", "offset": o, "bit": o % 8} for o in range(0, part.stat().st_size, part_stride)]
    plan += [{"file": "manifest", "offset": o, "bit": (o // 3) % 8} for o in range(0, reference.stat().st_size, manifest_stride)]
    return rng.sample(plan, min(sample, len(plan))) if sample else plan


def flip_worker(spec_path: Path) -> None:
    """Run a list of flips in this process, one JSON line per flip on stdout (the parent times them)."""
    import contextlib
    import io

    import numpy as np

    import cli
    from pipeline import load_cache, load_head
    from pipeline.errors import FeatcacheError
    from pipeline.store import parts_dir_for

    spec = json.loads(spec_path.read_text())
    reference, data, hub, scratch = Path(spec["reference"]), spec["data"], spec["hub"], Path(spec["scratch"])
    ref = load_cache(reference)
    ref_status = json.loads(spec["status"])
    ref_head = spec["head"]

    def same_rows(c) -> bool:
        return (list(c.paths) == list(ref.paths) and np.array_equal(c.labels, ref.labels) and c.classes == ref.classes
                and np.allclose(c.embeddings, ref.embeddings, rtol=1e-4, atol=1e-5) and c.meta.get("seed") == ref.meta.get("seed")
                and c.meta.get("embed_dim") == ref.meta.get("embed_dim") and c.meta.get("model") == ref.meta.get("model"))

    def run_cli(args: list[str]) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                cli.main(args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        return code, out.getvalue()

    for flip in spec["flips"]:
        t0 = time.perf_counter()
        cache = scratch / "c.h5"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        shutil.copy(reference, cache)
        shutil.copytree(parts_dir_for(reference), parts_dir_for(cache))
        target = cache if flip["file"] == "manifest" else parts_dir_for(cache) / flip["file"].split("/", 1)[1]
        raw = bytearray(target.read_bytes())
        raw[flip["offset"]] ^= 1 << flip["bit"]
        target.write_bytes(bytes(raw))
        result = dict(flip)
        try:
            result["load"] = "same" if same_rows(load_cache(cache)) else "WRONG"
        except FeatcacheError as exc:
            result["load"] = f"exit {exc.exit_code}"
        except Exception as exc:  # noqa: BLE001 - what the table counts
            result["load"] = f"crash {type(exc).__name__}"
        code, out = run_cli(["status", str(cache), "--no-verify", "--json"])
        if code == 0:
            got = json.loads(out)
            code = "same" if all(got.get(k) == ref_status.get(k) for k in ("rows", "classes", "provenance", "failures")) else "WRONG"
        result["status"] = code if isinstance(code, str) else f"exit {code}"
        head = scratch / "h.pt"
        code, _ = run_cli(["fit-head", str(cache), "--clf", "logreg", "--C", "1", "--out", str(head), "--json"])
        if code == 0:
            got = load_head(head)
            prov = got.provenance
            code = "same" if all(prov.get(k) == ref_head[k] for k in ("classes", "seed", "cache_fingerprint", "model", "embed_dim")) else "WRONG"
        result["fit"] = code if isinstance(code, str) else f"exit {code}"
        code, _ = run_cli(["extract", data, "-m", hub, "-w", "none", "--out", str(cache), "--repair", "--workers", "0", "--json"])
        try:
            repaired = same_rows(load_cache(cache))
        except Exception:  # noqa: BLE001
            repaired = False
        result["repair"] = f"exit {code}" + ("" if repaired else " NOT REPAIRED")
        result["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(result), flush=True)


def bit_flips(table: Table, data: Path, hub: str, work: Path, flips: list[dict], reference: Path) -> Counter:
    """Run ``flips`` in worker processes, each flip within FLIP_BUDGET_S; count what they answered."""
    from pipeline import load_head
    from pipeline.status import cache_status

    ref_head_path = work / "flip-ref.head.pt"
    assert run(cli("fit-head", str(reference), "--clf", "logreg", "--C", "1", "--out", str(ref_head_path))).returncode == 0
    head = load_head(ref_head_path)
    spec = {"reference": str(reference), "data": str(data), "hub": hub, "scratch": str(work / "flip"),
            "status": json.dumps(cache_status(reference, verify=False), default=str),
            "head": {k: head.provenance.get(k) for k in ("classes", "seed", "cache_fingerprint", "model", "embed_dim")}}
    outcomes: Counter = Counter()
    todo = list(flips)
    while todo:
        spec_path = work / "flip-spec.json"
        spec_path.write_text(json.dumps({**spec, "flips": todo}))
        proc = subprocess.Popen([sys.executable, __file__, "--flip-worker", str(spec_path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, cwd=ROOT)
        done = 0
        while done < len(todo):
            line = _readline_within(proc, FLIP_BUDGET_S)
            if line is None:  # no answer in time: a hang (or the worker died)
                flip = todo[done]
                ended_by_term = _terminate(proc)
                kind = "hang" if proc.returncode is None or ended_by_term is not None else "worker died"
                outcomes[kind] += 1
                if ended_by_term is False:
                    outcomes["hang not ended by SIGTERM"] += 1
                print(f"  no answer within {FLIP_BUDGET_S:g} s: {flip}", flush=True)
                table.add("bit flip", crash=True)
                done += 1
                break
            result = json.loads(line)
            done += 1
            bad = False
            for key in ("load", "status", "fit", "repair"):
                value = str(result[key])
                kind = ("silent wrong answer" if "WRONG" in value else "exit-1 crash" if value in ("exit 1", "1") or value.startswith("crash")
                        else "not repaired" if "NOT REPAIRED" in value else None)
                if kind:
                    outcomes[kind] += 1
                    bad = True
                    print(f"  {kind} ({key}): {result}", flush=True)
            named = any(str(result[k]) == "exit 5" for k in ("load", "status", "fit"))
            outcomes["damage named (exit 5)"] += named
            outcomes["flips"] += 1
            table.add("bit flip", lost=int("NOT REPAIRED" in str(result["repair"])), crash=bad,
                      codes=(5 if named else 0,))
        else:
            proc.wait()
        todo = todo[done:]
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return outcomes


def _readline_within(proc: subprocess.Popen, seconds: float) -> str | None:
    import select

    ready = select.select([proc.stdout], [], [], seconds)[0]
    if not ready:
        return None
    line = proc.stdout.readline()
    return line or None


def _terminate(proc: subprocess.Popen) -> bool | None:
    """SIGTERM a hung worker: True when it ended within 30 s (the watchdog's grace is 10 s),
    False when it had to be killed, None when it had already exited."""
    if proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 kills per command and 3 full disks (CI)")
    parser.add_argument("--kills", type=int, default=None)
    parser.add_argument("--disks", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flips", type=int, default=None, help="bit flips to sample from the sweep (default: all of it; --quick: 120)")
    parser.add_argument("--flip-worker", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.flip_worker:
        return flip_worker(a.flip_worker)
    kills = a.kills or (3 if a.quick else 12)
    disks = a.disks or (3 if a.quick else 8)
    rng = random.Random(a.seed)

    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.heads import fit_head
    from tests.tiny_backbone import write_tiny_hub

    with tempfile.TemporaryDirectory(prefix="featcache-faults-") as tmp:
        work = Path(tmp)
        hub = write_tiny_hub(work / "hub")
        data = write_digits(work / "digits", size=32, per_class=40 if a.quick else 80)
        cache = work / "base.h5"
        run_extract(data, hub, "none", cache, workers=0)
        head = Path(fit_head(cache, "logreg", work / "base.head.pt", plots=False).head_path)
        table = Table()
        print(f"faults: {kills} random kills per command, {disks} full disks; {sum(1 for _ in data.rglob('*.png'))} images, seed {a.seed}")
        extract_kills(table, data, hub, work, kills, rng)
        fit_head_kills(table, cache, work, kills, rng)
        finetune_kills(table, head, work, kills, rng)
        disk_full(table, data, hub, work, disks, rng)
        flip_data = write_digits(work / "flip-digits", size=32, per_class=4)
        reference = work / "flip-reference.h5"
        run_extract(flip_data, hub, "none", reference, workers=0)
        flips = flip_plan(reference, 7, 3, a.flips or (120 if a.quick else None), rng)
        print(f"bit flips: {len(flips)} (one bit each, every 7th byte of a part and every 3rd of the manifest{', sampled' if a.flips or a.quick else ''})")
        outcomes = bit_flips(table, flip_data, hub, work, flips, reference)
        table.print()
        print("bit flips: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
        print(json.dumps({"bad": table.bad}))
        if table.bad:
            raise SystemExit(f"FAILED: {table.bad} lost rows or crashes")


if __name__ == "__main__":
    main()
