"""The HTML report and the audit on a small real cache: digits through a random-init resnet18,
with copies of training images planted in val and test (exact, and resized + re-encoded as
JPEG), and one image deleted after extraction. The report must be one self-contained file
that a real headless browser opens without errors with every picture loaded."""
from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import IncompatibleError, UsageError
from pipeline.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """(cache, head, planted copies as (copy, original) relative paths, deleted file)."""
    from pipeline.demo import write_digits
    from pipeline.extract import run_extract
    from pipeline.heads import fit_head

    base = tmp_path_factory.mktemp("planted")
    data = write_digits(base / "digits", size=32, per_class=8, split=True)
    originals = sorted((data / "train").glob("*/*.png"))[::9][:5]
    copies = []
    for n, src in enumerate(originals):
        where = "test" if n == 4 else "val"
        dest = data / where / src.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        if n % 2 == 0:  # a byte-identical copy
            target = dest / f"copy_{src.name}"
            shutil.copy(src, target)
        else:  # resized and re-encoded
            target = dest / f"copy_{src.stem}.jpg"
            Image.open(src).convert("RGB").resize((48, 48), Image.Resampling.BICUBIC).save(target, quality=80)
        copies.append((str(target.relative_to(data)), str(src.relative_to(data))))
    cache = base / "digits.h5"
    run_extract(data, "resnet18", "none", cache, batch_size=64)
    head = Path(fit_head(cache, "logreg", base / "digits.logreg.head.pt", plots=False).head_path)
    gone = originals[0]
    gone.unlink()  # a file the report will want a thumbnail of (one side of a planted pair)
    return cache, head, copies, str(gone.relative_to(data))


class _Urls(html.parser.HTMLParser):
    """Every tag, and every URL-carrying attribute value, of a document."""

    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.charts, self.thumbs = set(), [], 0, 0

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "img":
            self.charts += dict(attrs).get("class") == "chart"
            self.thumbs += dict(attrs).get("class") != "chart"
        self.urls += [(tag, k, v or "") for k, v in attrs if k in ("src", "href", "srcset", "poster", "data", "action", "style")]


def test_report_is_one_self_contained_file(planted, tmp_path):
    _, head, copies, gone = planted
    out = tmp_path / "r.html"
    r = write_report(head, out=out)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # written through a temporary and renamed: nothing else left
    text = out.read_text(encoding="utf-8")
    doc = _Urls()
    doc.feed(text)
    assert not doc.tags & {"script", "link", "iframe", "object", "embed"}
    for tag, attr, value in doc.urls:
        if attr == "src":
            assert value.startswith("data:image/"), (tag, value[:60])
        elif attr == "href":
            assert value.startswith("#"), value
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    assert doc.charts == 3  # the val and test confusion matrices and the map
    assert doc.thumbs >= r.thumbnails >= 2 * len(copies) - 1  # at least both sides of every planted pair, but the deleted file
    assert r.counts["leaks"] >= len(copies) and "duplicate a training image" in " ".join(r.advice)
    assert r.missing_images >= 1 and gone in text  # the deleted file: a placeholder and a note, not a crash
    assert "resnet18" in text and "logreg" in text and "Confusion matrix (val)" in text


def test_every_planted_copy_is_a_leak(planted):
    from pipeline.quality import audit_cache

    cache, _, copies, _ = planted
    audit = audit_cache(cache)
    pairs = {frozenset((e["a"], e["b"])): e for e in (audit.duplicate(p) for p in range(len(audit.duplicates)))}
    for n, (copy, original) in enumerate(copies):
        e = pairs[frozenset((copy, original))]
        assert e["leak"] and e["exact"] == (n % 2 == 0), e  # byte-identical copies are marked exact, re-encoded ones are not
    assert len(pairs) == len(copies), sorted(pairs)  # and nothing else in the clean digits


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
def test_report_opens_in_headless_chromium(planted, tmp_path):
    """No console or resource error, every <img> decoded; a screenshot is kept as the test's artifact."""
    _, head, _, _ = planted
    out = tmp_path / "report.html"
    write_report(head, out=out)
    probe = tmp_path / "probe.html"  # the report plus a check that writes its verdict into the DOM
    check = ("<script>var errs=[];window.addEventListener('error',function(e){errs.push(String(e.message||(e.target&&e.target.src||'').slice(0,40)))},true);"
             "window.addEventListener('load',function(){var im=Array.prototype.slice.call(document.images);"
             "var bad=im.filter(function(i){return !(i.complete&&i.naturalWidth>0)}).length;"
             "document.title='CHECK '+JSON.stringify({images:im.length,bad:bad,errors:errs})})</script>")
    probe.write_text(out.read_text(encoding="utf-8").replace("<head>", "<head>" + check, 1), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    proc = subprocess.run([CHROMIUM, *flags, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    verdict = json.loads(proc.stdout.split("<title>CHECK ", 1)[1].split("</title>", 1)[0].replace("&quot;", '"'))
    assert verdict["images"] > 10 and verdict["bad"] == 0 and verdict["errors"] == [], verdict
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}", out.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400) and len(set(np.asarray(image.convert("L").resize((64, 120))).ravel().tolist())) > 20  # not blank
    if os.environ.get("FEATCACHE_TEST_ARTIFACTS"):  # CI keeps it
        Path(os.environ["FEATCACHE_TEST_ARTIFACTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["FEATCACHE_TEST_ARTIFACTS"]) / "report.png")


def test_report_refuses_what_does_not_fit(planted, tiny_head, tmp_path):
    cache, head, _, _ = planted
    with pytest.raises(IncompatibleError, match="tinybn|resnet18"):  # a head of another backbone on this cache: the check evaluate uses
        write_report(tiny_head, cache=cache, out=tmp_path / "x.html")
    with pytest.raises(UsageError, match="name it \\*.html"):
        write_report(head, out=tmp_path / "x.pdf")
    with pytest.raises(UsageError, match="does not exist"):
        write_report(tmp_path / "missing.pt")
    assert not list(tmp_path.iterdir())


def test_report_of_a_fine_tuned_model(tiny_head, tmp_path):
    """A fine-tuned model has no cache of its own backbone: metrics from the model file, data sections from its base head's cache."""
    from pipeline.finetune import run_finetune

    model = run_finetune(tiny_head, tmp_path / "m.pt", epochs=0, workers=0, plots=False, trust_hub=True).model_path
    r = write_report(model)
    text = Path(r.path).read_text(encoding="utf-8")
    assert r.path == str(tmp_path / "m.report.html") and r.cache is not None and "base head" in text and "fine-tuned model" in text
    assert r.metrics["val"]["accuracy"] is not None and "per-image predictions need a cache of the fine-tuned backbone" in text


def test_cli_fit_head_report_and_audit_fail_on(planted, tmp_path):
    """In-process (typer's runner): fit-head --report writes the report; audit exits 8 only with --fail-on."""
    from typer.testing import CliRunner

    from cli import app

    cache, _, copies, _ = planted
    runner = CliRunner()
    fit = runner.invoke(app, ["fit-head", str(cache), "--out", str(tmp_path / "h.pt"), "--report", "--json"])
    assert fit.exit_code == 0, fit.output
    report = json.loads(fit.stdout.strip().splitlines()[-1])["reports"]["report_html"]
    assert report == str(tmp_path / "h.report.html") and Path(report).is_file()
    audit = runner.invoke(app, ["audit", str(cache), "--json", "--fail-on", "leaks,label-errors"])
    assert audit.exit_code == 8, audit.output
    result = json.loads(audit.stdout.strip().splitlines()[-1])
    assert result["exit_code"] == 8 and result["counts"]["leaks"] >= len(copies) and result["failing"][0].startswith("leaks")
    assert runner.invoke(app, ["audit", str(cache), "--json"]).exit_code == 0  # findings alone never fail a run
    bad = runner.invoke(app, ["audit", str(cache), "--fail-on", "leak"])
    assert bad.exit_code == 2 and "--fail-on 'leak'" in bad.output


def test_only_markup_built_as_html_skips_escaping():
    """Cells, keys and captions are escaped unless built as ``Markup``: no flag lets a string through."""
    from markupsafe import Markup

    from pipeline.report.html import cards, key_values, table

    hostile = "<img src=x onerror=alert(1)>"
    out = table(["a", "b"], [[hostile, Markup("<b>bold</b>")]])
    assert "&lt;img src=x onerror=alert(1)&gt;" in out and "<img" not in out and "<b>bold</b>" in out
    assert "<img" not in key_values([(hostile, hostile)]) and "<img" not in cards([(hostile, hostile)])
