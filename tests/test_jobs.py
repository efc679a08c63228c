"""Batch jobs for cron: `run JOB.toml` does only stale work, validates the whole file up front,
locks what it writes, logs for machines, and `status` tells caches, heads, models and jobs apart."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import load_cache
from pipeline.jobs.runner import run_job
from pipeline.jobs.spec import JobFileError, load_job
from pipeline.store.locks import WriterLock, lock_path_for

from conftest import ROOT, make_image, run_cli

pytestmark = pytest.mark.slow


def _write_job(folder: Path, tiny_hub: str, finetune: bool = True, extra: str = "", finetune_extra: str = "", report: bool = False) -> Path:
    """The job these tests run; ``report``: an HTML report and an audit per head (seconds each,
    so only where they are what a test checks)."""
    job = folder / "nightly job é.toml"  # spaces and non-ASCII in the path on purpose
    text = f'''
name = "nightly"
data = ["digits"]
cache_dir = "cache"
out_dir = "runs"
workers = 0
report = {str(report).lower()}

[[backbones]]
model = "{tiny_hub}"
weights = "none"
batch_size = 64

[[heads]]
clf = "logreg"

[[heads]]
name = "lin"
clf = "linear"
epochs = 5
{extra}
'''
    if finetune:
        text += '\n[finetune]\nfrom_head = "logreg"\nepochs = 1\nbatch_size = 16\naugment = "light"\n' + finetune_extra
    job.write_text(text)
    return job


@pytest.fixture
def job_dir(tmp_path):
    from pipeline.demo import write_digits

    write_digits(tmp_path / "digits", size=32, per_class=8)
    return tmp_path


def _json_run(*args: str, expect: int = 0) -> dict:
    proc = run_cli("run", *args, "--json")
    assert proc.returncode == expect, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_second_run_of_an_unchanged_job_does_nothing(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub, report=True)
    first = _json_run(str(job))
    assert [(s["kind"], s["action"]) for s in first["steps"]] == [("extract", "run"), ("fit-head", "run"), ("fit-head", "run"), ("finetune", "run")]
    assert first["did_work"] and first["steps"][0]["summary"]["new"] == 80
    report = json.loads(Path(first["report"]).read_text())
    assert report["completed"] and len(report["steps"]) == 4
    heads = sorted((job_dir / "runs").glob("*/*/head.pt"))
    assert len(heads) == 2 and len({p.parent for p in heads}) == 2  # a folder per head, its reports inside
    assert all((p.parent / "head.metrics.json").is_file() for p in heads)
    assert all("featcache report" in (p.parent / "head.report.html").read_text() for p in heads)  # each head's HTML report
    tuned = Path(first["steps"][3]["summary"]["reports"]["report_html"])
    assert tuned.name == "finetuned.report.html" and "featcache report" in tuned.read_text()  # and the fine-tune's
    (counts,) = report["audit"].values()  # the cache's audit, once for both heads
    assert set(counts) == {"label-errors", "duplicates", "leaks", "imbalance", "failed-files"} and counts["failed-files"] == 0
    assert not list((job_dir / "runs").glob("*.lock")) and not list((job_dir / "runs").rglob("[!.]*.lock"))  # locks are hidden
    mtimes = [p.stat().st_mtime_ns for p in heads]

    second = run_cli("run", str(job))
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr and "0 step(s) ran, 4 up to date" in second.stdout  # the log on stderr, the result on stdout
    assert [p.stat().st_mtime_ns for p in heads] == mtimes  # nothing was rewritten
    assert json.loads(Path(first["report"]).read_text())["audit"] == report["audit"]  # counts kept from the last audit

    plan = json.loads(run_cli("status", str(job), "--json").stdout)
    assert not plan["did_work"] and {s["action"] for s in plan["steps"]} == {"skip"}


def test_new_image_refits_heads_and_restarts_the_finetune(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub)
    _json_run(str(job))
    make_image(job_dir / "digits" / "digit_3" / "new.png", size=(32, 32), seed=99)
    plan = run_cli("status", str(job))
    assert "1 new file(s)" in plan.stdout and "its cache changed" not in plan.stdout  # the cache itself has not changed yet
    r = _json_run(str(job))
    actions = {(s["kind"], Path(s["target"]).parent.name if s["kind"] != "extract" else ""): s for s in r["steps"]}
    assert r["steps"][0]["summary"]["new"] == 1 and r["steps"][0]["summary"]["cached"] == 80
    assert all(s["action"] == "run" and "cache changed" in s["reason"] for s in r["steps"] if s["kind"] == "fit-head")
    assert r["steps"][-1]["action"] == "start over" and "head or options changed" in r["steps"][-1]["reason"]
    assert len(actions) == 4


def test_changed_head_setting_refits_only_that_head(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub, finetune=False)
    _json_run(str(job))
    r = _json_run(str(job), "--set", "heads.1.epochs=7")
    assert [(s["kind"], s["action"]) for s in r["steps"]] == [("extract", "skip"), ("fit-head", "skip"), ("fit-head", "run")]
    assert "settings in the job file changed" in r["steps"][2]["reason"]
    forced = _json_run(str(job), "--set", "heads.1.epochs=7", "--force")
    assert [s["action"] for s in forced["steps"]] == ["skip", "run", "run"]


def test_more_finetune_epochs_resume_the_checkpoint(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub)
    _json_run(str(job))
    r = _json_run(str(job), "--set", "finetune.epochs=2")
    assert r["steps"][-1]["action"] == "resume" and r["steps"][-1]["summary"]["epochs_done"] == 2


def test_every_problem_in_the_job_file_is_reported_before_any_work(job_dir, tiny_hub):
    bad = job_dir / "bad.toml"
    bad.write_text('''
data = ["digits", "missing"]
devcie = "cpu"
[[backbones]]
model = "resnet5O"
batch_size = "big"
[[heads]]
clf = "svm"
[[heads]]
clf = "logreg"
class_weight = "heavy"
[finetune]
from_head = "nope"
optimizer = "lion"
''')
    proc = run_cli("run", str(bad))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for needle in ("8 problem(s)", "did you mean 'device'", "missing' does not exist", "did you mean resnet50", "batch_size: expected an integer",
                   "--clf 'svm': choose one of", "'heavy'", "no head named 'nope'", "'lion'"):
        assert needle in proc.stderr, needle
    assert not (job_dir / "cache").exists() and not (job_dir / "runs").exists()


def test_job_file_errors(tmp_path):
    with pytest.raises(JobFileError, match="does not exist"):
        load_job(tmp_path / "none.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("data = [\n")
    with pytest.raises(JobFileError, match="not valid TOML"):
        load_job(broken)
    (tmp_path / "d").mkdir()
    ok = tmp_path / "ok.toml"
    ok.write_text('data = "d"\n[[backbones]]\nmodel = "resnet18"\n')
    job = load_job(ok, ["backbones.0.weights=none", "device=cpu"])
    assert job.backbones[0].weights == "none" and job.device == "cpu" and job.data == [tmp_path / "d"]
    with pytest.raises(JobFileError, match="KEY=VALUE"):
        load_job(ok, ["novalue"])
    with pytest.raises(JobFileError, match="not an entry"):
        load_job(ok, ["backbones.3.model=x"])


def test_a_running_job_locks_its_file_and_waits(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub, finetune=False)
    with WriterLock(job.resolve(), command="test"):
        proc = run_cli("run", str(job))
    assert proc.returncode == 4 and f"PID {os.getpid()}" in proc.stderr and "--wait" in proc.stderr
    head = job_dir / "h.pt"
    with WriterLock(head, command="test"):  # fit-head locks its output too
        proc = run_cli("fit-head", str(job_dir / "nothing.h5"), "--out", str(head))
    assert proc.returncode in (2, 4)  # the missing cache (a bad path: 2) may be noticed first; never a crash


def test_lock_left_by_a_killed_process_is_recovered_with_a_message(job_dir, tiny_hub):
    cache = job_dir / "c.h5"
    lock_path_for(cache).write_text(json.dumps({"pid": 999999, "host": "gone", "since": time.time() - 60, "command": "extract"}))
    proc = run_cli("extract", str(job_dir / "digits"), "-m", tiny_hub, "-w", "none", "--out", str(cache), "--workers", "0")
    assert proc.returncode == 0, proc.stderr
    assert "recovered the lock" in proc.stderr and "PID 999999" in proc.stderr
    assert not lock_path_for(cache).exists()  # released cleanly: no empty lock file left beside the cache


def test_log_file_and_json_lines(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub, finetune=False)
    text_log, json_log = job_dir / "logs" / "run.log", job_dir / "run.jsonl"
    proc = run_cli("--log-file", str(text_log), "run", str(job), "--quiet")
    assert proc.returncode == 0 and proc.stderr == ""  # --quiet: nothing on the terminal ...
    content = text_log.read_text()
    assert "fit-head logreg" in content and " INFO " in content  # ... everything in the file, timestamped
    assert run_cli("--log-file", str(json_log), "--log-json", "run", str(job)).returncode == 0
    events = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert events and all({"time", "level", "message"} <= set(e) for e in events)
    assert any("nothing to do" in e["message"] for e in events)
    bad = run_cli("--log-file", str(job_dir / "runs"), "models")  # a folder cannot be a log file
    assert bad.returncode == 2 and "--log-file" in bad.stderr


def test_the_console_log_follows_sys_stderr(monkeypatch):
    """A caller that swaps stderr and closes its stream afterwards (pytest, CliRunner, notebooks)
    must not leave the logger writing to a closed file: later records reach the current stderr."""
    import io

    from pipeline import logs

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logs.configure()
    logs.info("one")
    first.close()
    monkeypatch.setattr(sys, "stderr", second)
    logs.warning("two")  # before the fix: "--- Logging error --- ValueError: I/O operation on closed file"
    assert second.getvalue() == "two\n"
    logs.reset()


def test_failed_inputs_give_exit_3_and_sigterm_130(job_dir, tiny_hub):
    (job_dir / "digits" / "digit_0" / "broken.png").write_bytes(b"not a png")
    job = _write_job(job_dir, tiny_hub, finetune=False)
    r = _json_run(str(job), expect=3)
    assert r["failed_inputs"] == 1 and r["exit_code"] == 3

    # SIGTERM while a job extracts: exit 130, committed rows kept
    big = job_dir / "big"
    for i in range(400):
        make_image(big / ("a" if i % 2 else "b") / f"{i:03d}.png", size=(32, 32), seed=i)
    job2 = job_dir / "big.toml"
    job2.write_text('data = ["big"]\ncache_dir = "bigcache"\nworkers = 0\n[[backbones]]\nmodel = "resnet18"\nweights = "none"\nbatch_size = 4\ncommit_every = 8\n')
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "run", str(job2)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    caches = job_dir / "bigcache"

    def committed() -> bool:  # the first part is committed: the job is inside its extract loop
        return any(len(load_cache(c)) > 0 for c in caches.glob("*.h5")) if caches.is_dir() else False

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not committed():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    cache = next(caches.glob("*.h5"))
    assert 0 < len(load_cache(cache)) < 400
    report = json.loads((job_dir / "runs" / "big" / "big.run.json").read_text())
    assert report["completed"] is False


def test_status_of_head_and_model_says_when_stale(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub)
    _json_run(str(job))
    head = next((job_dir / "runs").glob("*/logreg/head.pt"))
    model = next((job_dir / "runs").glob("*/*/finetuned.pt"))
    s = json.loads(run_cli("status", str(head), "--json").stdout)
    assert s["stale"] is False and s["kind"] == "logreg head" and s["n_train"] > 0
    m = json.loads(run_cli("status", str(model), "--json").stdout)
    assert m["kind"] == "fine-tuned model" and m["stale"] is False
    make_image(job_dir / "digits" / "digit_1" / "extra.png", size=(32, 32), seed=5)
    run_job(job, ["heads.0.C=1.0"], dry_run=True)  # planning changes nothing
    cache = next((job_dir / "cache").glob("*.h5"))
    assert run_cli("extract", str(job_dir / "digits"), "-m", tiny_hub, "-w", "none", "--out", str(cache), "--workers", "0").returncode == 0
    s = run_cli("status", str(head))
    assert "STALE" in s.stdout and "cache changed" in s.stdout
    shutil.copy(head, job_dir / "copy.pt")
    assert run_cli("status", str(job_dir)).returncode == 2  # a folder is a bad path


def test_the_readme_job_example_is_valid(tmp_path):
    """The job file shown in the README parses and validates (its data folder swapped for a real one)."""
    import re

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```toml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "data").mkdir()
    job_file = tmp_path / "nightly.toml"
    job_file.write_text(block)
    job = load_job(job_file, [f'data=["{tmp_path / "data"}"]'])
    assert [b.model for b in job.backbones] == ["resnet50", "efficientnet_b0"] and [h.name for h in job.heads] == ["logreg", "mlp-wide"]
    assert job.finetune.from_head == "logreg" and job.finetune.options.epochs == 3


def test_backbones_with_the_same_options_share_one_pass(job_dir, tiny_hub, monkeypatch):
    """Two backbones, same weights and extract options: each file decoded once, two caches."""
    import pipeline.images.reader as reader

    # the second backbone shares the first's weights and extract options (batch_size 64)
    job = _write_job(job_dir, tiny_hub, finetune=False, extra='[[backbones]]\nmodel = "mobilenet_v3_small"\nweights = "none"\nbatch_size = 64\n')
    decodes: list[int] = []
    real = reader.decode_image
    monkeypatch.setattr(reader, "decode_image", lambda *a, **k: decodes.append(1) or real(*a, **k))
    result = run_job(job)
    extracts = [s for s in result.steps if s.kind == "extract"]
    assert [s.action for s in extracts] == ["run", "run"] and len({s.target for s in extracts}) == 2
    assert len(decodes) == 80  # 10 classes x 8 digits, once each for both backbones
    assert [len(load_cache(s.target)) for s in extracts] == [80, 80]
    assert sum(s.kind == "fit-head" and s.action == "run" for s in result.steps) == 4  # both heads on both caches


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", "", "x" * 101, "sp ace"])
def test_head_and_job_names_must_be_one_path_component(tmp_path, name):
    (tmp_path / "data").mkdir()
    (tmp_path / "job.toml").write_text(f'data = ["data"]\n[[backbones]]\nmodel = "resnet18"\n[[heads]]\nclf = "logreg"\nname = {json.dumps(name)}\n')
    proc = run_cli("run", str(tmp_path / "job.toml"))
    assert proc.returncode == 2 and "cannot be a file name" in proc.stderr and "heads[0].name" in proc.stderr
    (tmp_path / "job2.toml").write_text(f'name = {json.dumps(name)}\ndata = ["data"]\n[[backbones]]\nmodel = "resnet18"\n[[heads]]\nclf = "logreg"\n')
    proc = run_cli("run", str(tmp_path / "job2.toml"))
    assert proc.returncode == 2 and "job.name" in proc.stderr and "cannot be a file name" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "job.toml", "job2.toml"]  # nothing written anywhere


def test_a_job_whose_finetune_diverges_records_the_failed_step(job_dir, tiny_hub):
    job = _write_job(job_dir, tiny_hub, finetune_extra="lr_backbone = 1e12\nlr_head = 1e12\nclip_grad = 0.0\n")
    proc = run_cli("run", str(job), "--json")
    assert proc.returncode == 7, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["error_type"] == "TrainingDivergedError"
    report = json.loads(next((job_dir / "runs").glob("*.run.json")).read_text())
    assert report["completed"] is False and report["error"]["exit_code"] == 7 and report["error"]["step"] == "finetune"
    assert [(s["kind"], s["action"]) for s in report["steps"]] == [("extract", "run"), ("fit-head", "run"), ("fit-head", "run"), ("finetune", "failed")]
    failed = report["steps"][-1]["summary"]
    assert "training diverged" in failed["error"] and failed["exit_code"] == 7 and failed["planned"] == "run"
