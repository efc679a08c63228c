"""The command line as users and cron see it: exit codes, one-line errors, one JSON object."""
from __future__ import annotations

import json

import h5py
import pytest

from conftest import cli_json, make_image, run_cli


def _one_line_error(proc, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_extract_json_summary(tmp_path, image_tree):
    out = tmp_path / "c h5 with spaces é.h5"
    s = cli_json("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--out", str(out))
    assert s["new"] == 12 and s["failed"] == 0 and s["cache"] == str(out)
    assert {"new", "cached", "failed", "removed", "failures", "seconds", "images_per_s", "cache"} <= set(s)
    again = cli_json("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--out", str(out))
    assert again["new"] == 0 and again["cached"] == 12


def test_failed_inputs_exit_3(tmp_path, image_tree):
    (image_tree / "cat" / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    s = cli_json("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--out", str(tmp_path / "c.h5"), expect=3)
    assert s["failed"] == 1 and s["failures"][0]["path"] == "cat/bad.jpg"


def test_default_out_under_cache_dir(tmp_path, image_tree):
    proc = run_cli("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--json", env={"FEATCACHE_CACHE_DIR": str(tmp_path / "cc")})
    assert proc.returncode == 0, proc.stderr
    path = json.loads(proc.stdout)["cache"]
    assert path.startswith(str(tmp_path / "cc")) and "resnet18__none__imgs-" in path


@pytest.mark.parametrize("args,code,needles", [
    (["extract", "/nonexistent/dir", "-m", "resnet18"], 2, ["/nonexistent/dir", "does not exist"]),
    (["extract", "{file}", "-m", "resnet18"], 2, ["is a file"]),
    (["extract", "{empty}", "-m", "resnet18"], 2, ["no images found"]),
    (["extract", "{tree}", "-m", "resnet5O"], 2, ["did you mean", "resnet50"]),
    (["extract", "{tree}", "-m", "resnet18", "-w", "IMAGENET_V9"], 2, ["--weights", "choices"]),
    (["extract", "{tree}", "-m", "resnet18", "--device", "cuda"], 2, ["--device cuda"]),
    (["extract", "{tree}", "-m", "resnet18", "-w", "none", "--batch-size", "0"], 2, ["--batch-size"]),
    (["status", "{file}"], 5, ["not a readable HDF5"]),
    (["status", "{foreign}"], 5, ["not a featcache cache"]),
    (["status", "/nonexistent.h5"], 2, ["does not exist"]),
])
def test_bad_input_one_line_error(tmp_path, image_tree, args, code, needles):
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    f = tmp_path / "file.h5"
    f.write_text("hello")
    (tmp_path / "empty").mkdir()
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h:
        h["x"] = [1, 2]
    subs = {"{file}": str(f), "{empty}": str(tmp_path / "empty"), "{tree}": str(image_tree), "{foreign}": str(foreign)}
    _one_line_error(run_cli(*[subs.get(a, a) for a in args]), code, *needles)


def test_other_backbone_refused_with_exit_5(tmp_path, image_tree):
    out = str(tmp_path / "c.h5")
    assert run_cli("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--out", out).returncode == 0
    _one_line_error(run_cli("extract", str(image_tree), "-m", "resnet34", "-w", "none", "--out", out), 5, "resnet18", "resnet34", "--out")


def test_json_error_object(tmp_path):
    proc = run_cli("extract", str(tmp_path / "missing"), "-m", "resnet18", "--json")
    assert proc.returncode == 2
    obj = json.loads(proc.stdout)
    assert obj["exit_code"] == 2 and "does not exist" in obj["error"]


def test_status_shows_cache(tmp_path, image_tree):
    out = tmp_path / "c.h5"
    run_cli("extract", str(image_tree), "-m", "resnet18", "-w", "none", "--out", str(out), check=True)
    make_image(image_tree / "cat" / "later.png", seed=42)
    s = cli_json("status", str(out))
    assert s["rows"] == 12 and s["classes"] == {"cat": 4, "dog": 4, "eel": 4}
    assert s["not_extracted"] == 1 and s["provenance"]["model"] == "resnet18"
    text = run_cli("status", str(out), check=True).stdout
    assert "resnet18" in text and "1 file(s) on disk not yet extracted" in text


def test_help_documents_exit_codes():
    out = run_cli("extract", "--help", check=True).stdout
    assert "Exit codes" in out and "lock held" in out


@pytest.mark.parametrize("argv, code, kind", [
    (["models", "--json"], 1, "InternalError"),  # a bug inside a command
    (["fit-head", "x.h5", "--clf", "svm", "--json"], 2, "UsageError"),  # refused by the parser
])
def test_json_errors_are_one_object_on_stdout(argv, code, kind):
    """--json promises {"error", "exit_code"} on every error: internal errors and the parser's too."""
    import subprocess
    import sys

    from conftest import ROOT

    boom = "import pipeline.backbones.catalog as b; b.list_backbones = lambda *a, **k: 1 / 0; "
    proc = subprocess.run([sys.executable, "-c", boom + f"import sys; sys.argv[0] = 'cli.py'; import cli; cli.main({argv!r})"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == code and out["error_type"] == kind and out["error"]
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1 and "Traceback" not in proc.stderr


def test_no_command_prints_the_help_and_no_error_line():
    proc = run_cli()
    assert "Usage" in proc.stdout + proc.stderr and "fit-head" in proc.stdout + proc.stderr
    assert "error:" not in proc.stderr and "Traceback" not in proc.stderr


def test_every_help_text_keeps_its_brackets():
    """Help is printed as written: ``pip install -e '.[gpu]'`` and ``[test/]`` keep their brackets
    (a markup renderer once ate them)."""
    import re

    import typer

    import cli

    group = typer.main.get_command(cli.app)
    checked = 0
    for name, command in group.commands.items():
        shown = " ".join(run_cli(name, "--help").stdout.split())
        for param in command.params:
            for bracketed in re.findall(r"\[[^\]]*\]", getattr(param, "help", None) or ""):
                assert " ".join(bracketed.split()) in shown, (name, param.name, bracketed)
                checked += 1
    assert checked >= 2  # at least the two that were lost: '.[gpu]' and [test/]


def test_no_cuda_home_warning_on_a_cpu_machine(caplog):
    """torch.compile's import of cpp_extension logs "No CUDA runtime is found" on CPU machines;
    featcache drops that one message and nothing else from that logger."""
    import logging

    import pipeline  # noqa: F401 - installs the filter

    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        logger.warning("some other warning")
    assert [r.getMessage() for r in caplog.records] == ["some other warning"]


def test_results_go_to_stdout_and_messages_to_stderr(tmp_path, image_tree, tiny_hub):
    """`fit-head ... > fit.txt` keeps the result: the summary and metrics on stdout; --quiet
    prints neither; --log-file still records the summary."""
    cache, head = tmp_path / "c.h5", tmp_path / "h.pt"
    ex = run_cli("extract", str(image_tree), "-m", tiny_hub, "-w", "none", "--out", str(cache), "--workers", "0")
    assert ex.returncode == 0 and f"{cache}: 12 new" in ex.stdout and f"{cache}: 12 new" not in ex.stderr
    fit = run_cli("fit-head", str(cache), "--clf", "logreg", "--out", str(head))
    assert fit.returncode == 0, fit.stderr
    assert "logreg head fitted on" in fit.stdout and "val" in fit.stdout and "head fitted" not in fit.stderr
    log = tmp_path / "run.log"
    quiet = run_cli("--log-file", str(log), "fit-head", str(cache), "--clf", "logreg", "--out", str(head), "--quiet")
    assert quiet.returncode == 0 and quiet.stdout == "" and "head fitted" not in quiet.stderr
    assert "logreg head fitted on" in log.read_text()
