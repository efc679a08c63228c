"""The library reports through standard logging; the command line's handler owns the terminal."""
from __future__ import annotations

import inspect
import io
import logging
import sys

import pytest


def test_a_library_caller_gets_standard_logging(tmp_path, image_tree, tiny_hub, caplog):
    """No handler of ours: records propagate from the module's own logger to whatever the caller set up."""
    from pipeline.extract import run_extract

    with caplog.at_level(logging.INFO, logger="pipeline"):
        run_extract(image_tree, tiny_hub, "none", tmp_path / "a.h5", workers=0)
    said = {(r.name, r.getMessage()) for r in caplog.records}
    assert any(name == "pipeline.extract" and "12 to extract, 0 cached" in msg for name, msg in said), said
    assert any(name == "pipeline.backbones.engines" and "engine auto -> eager" in msg for name, msg in said), said


@pytest.mark.parametrize("entry", ["pipeline.extract:extract_many", "pipeline.heads.fit:fit_head", "pipeline.finetune.run:run_finetune",
                                   "pipeline.predict:predict", "pipeline.quality.audit:audit_cache", "pipeline.report.build:write_report",
                                   "pipeline.jobs.runner:run_job", "pipeline.serving.server:serve", "pipeline.exchange.export:export_cache"])
def test_no_entry_point_takes_a_log_callable(entry):
    """One way to report: logging, not a ``log=`` callable threaded through signatures."""
    import importlib

    module, name = entry.split(":")
    assert "log" not in inspect.signature(getattr(importlib.import_module(module), name)).parameters


@pytest.mark.parametrize("rank, expected", [("0", "hello\ncareful\n"), ("1", "[rank 1] careful\n")])
def test_under_torchrun_only_rank_0_says_what_happens(monkeypatch, rank, expected):
    """Every rank runs the same code: rank 0's messages, and each rank's warnings marked with its rank."""
    from pipeline import logs

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("RANK", rank)
    logs.configure()
    try:
        logging.getLogger("pipeline.extract").info("hello")
        logging.getLogger("pipeline.heads.fit").warning("careful")
    finally:
        logs.reset()
    assert err.getvalue() == expected


def test_reset_keeps_a_callers_own_handler_and_level(said):
    """The command line removes only the handlers it installed, and leaves the level and
    propagation of the ``pipeline`` logger as the caller had set them (``said``: INFO)."""
    from pipeline import logs

    logger = logging.getLogger("pipeline")
    logs.configure()
    logs.reset()
    assert (logger.level, logger.propagate) == (logging.INFO, True)
    logging.getLogger("pipeline.demo").info("still heard")
    assert said == ["still heard"]
