"""Export (Parquet, npy + metadata.parquet) and import: what pyarrow, pandas and numpy read
back equals load_cache, filters, import round trips, heads on imported caches, bounded
memory, atomic replacement, and one clear line for every bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline import load_cache
from pipeline.errors import DataError, UsageError
from pipeline.exchange import EXPORT_SCHEMA, export_cache, import_cache
from pipeline.store import CacheWriter, new_cache_meta

from conftest import ROOT, cli_json, run_cli

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

CLASSES = ["cat", "dög", "eel"]
DIM = 12


def _write_cache(path: Path, dtype: str = "float32", rows: int = 240) -> Path:
    """Two commits (so two parts), a replaced row, unlabeled rows, every split, non-ASCII names."""
    meta = new_cache_meta("testnet", DIM, CLASSES, weights="none", preprocessing={"resize_size": [32], "crop_size": [32], "mean": [0.5] * 3},
                          dtype=dtype, data_root="/data/pets", layout="split", seed=3, featcache_version="0.1.0")
    rng = np.random.default_rng(0)
    ids = np.arange(rows)
    labels = np.where(ids % 11 == 0, -1, ids % 3)
    paths = [f"{CLASSES[l] if l >= 0 else 'unsorted'}/{i:04d}{'ü' if i % 7 == 0 else ''}.jpg" for i, l in zip(ids.tolist(), labels.tolist())]
    split = [("train", "val", "test", "")[i % 4] for i in ids.tolist()]
    emb = rng.standard_normal((rows, DIM)).astype(dtype)
    half = rows // 2
    with CacheWriter.open(path, meta) as w:
        w.add_columns(paths[half:], emb[half:], labels=labels[half:], split=split[half:])
        w.commit()
        w.add_columns(paths[:half], emb[:half], labels=labels[:half], split=split[:half])
        w.add_columns([paths[-1]], emb[:1] + 1, labels=[labels[-1]], split=[split[-1]])  # replaces the last row of the first commit
        w.commit()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return _write_cache(tmp_path_factory.mktemp("export") / "pets.h5")


def _class_names(c) -> list:
    return [c.classes[l] if l >= 0 else None for l in c.labels.tolist()]


def _assert_rows_equal(table, c, rows=None) -> None:
    """A pyarrow table (path, label, class, split[, embedding]) holds exactly load_cache's rows (at ``rows``)."""
    rows = np.arange(len(c)) if rows is None else rows
    assert table.column("path").to_pylist() == c.paths[rows].tolist()
    assert table.column("label").to_pylist() == c.labels[rows].tolist()
    assert table.column("class").to_pylist() == [_class_names(c)[i] for i in rows.tolist()]
    assert table.column("split").to_pylist() == c.split[rows].tolist()
    if "embedding" in table.column_names:
        emb = table.column("embedding").combine_chunks()
        got = emb.flatten().to_numpy(zero_copy_only=False).reshape(len(emb), -1)
        assert got.dtype == c.embeddings.dtype and np.array_equal(got, c.embeddings[rows])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_parquet_export_reads_back_as_load_cache(tmp_path, dtype):
    src = _write_cache(tmp_path / f"c-{dtype}.h5", dtype)
    c = load_cache(src)
    s = export_cache(src, tmp_path / "out", "parquet", row_group_rows=50)
    f = tmp_path / "out" / "embeddings.parquet"
    assert s.rows == len(c) == 240 and s.files == [str(f)] and s.row_groups == 5 and s.embedding_bytes == c.embeddings.nbytes
    assert pq.ParquetFile(f).metadata.num_row_groups == 5
    t = pq.read_table(f)
    assert t.schema.field("embedding").type == pa.list_(pa.field("element", pa.from_numpy_dtype(np.dtype(dtype)), nullable=False), DIM)
    assert [t.schema.field(n).type for n in ("path", "label", "class", "split")] == [pa.string(), pa.int32(), pa.string(), pa.string()]
    _assert_rows_equal(t, c)
    md = t.schema.metadata
    assert md[b"featcache.schema"].decode() == EXPORT_SCHEMA
    assert json.loads(md[b"featcache.provenance"]) == c.meta
    info = json.loads(md[b"featcache.export"])
    assert info["rows"] == 240 and info["format"] == "parquet" and info["dtype"] == dtype
    df = pd.read_parquet(f)  # pandas reads it as it is
    assert df["path"].tolist() == c.paths.tolist() and df["label"].tolist() == c.labels.tolist()
    assert [None if pd.isna(v) else v for v in df["class"]] == _class_names(c) and df["split"].tolist() == c.split.tolist()
    assert np.array_equal(np.stack(df["embedding"].to_numpy()), c.embeddings)
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp-" in p.name]


def test_npy_layout_reads_back_as_load_cache(cache, tmp_path):
    c = load_cache(cache)
    s = export_cache(cache, tmp_path / "out", "npy", row_group_rows=64)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "metadata.parquet", "provenance.json"] and s.rows == len(c)
    emb = np.load(out / "embeddings.npy", mmap_mode="r")
    assert emb.shape == c.embeddings.shape and emb.dtype == c.embeddings.dtype and np.array_equal(emb, c.embeddings)
    meta_table = pq.read_table(out / "metadata.parquet")
    assert meta_table.column_names == ["path", "label", "class", "split"]
    _assert_rows_equal(meta_table, c)
    assert json.loads(meta_table.schema.metadata[b"featcache.provenance"]) == c.meta
    doc = json.loads((out / "provenance.json").read_text())
    assert doc["provenance"] == c.meta and doc["schema"] == EXPORT_SCHEMA and doc["export"]["rows"] == len(c)
    assert pd.read_parquet(out / "metadata.parquet")["path"].tolist() == c.paths.tolist()


def test_filters_by_split_and_class_through_the_cli(cache, tmp_path):
    c = load_cache(cache)
    r = cli_json("export", str(cache), "--format", "parquet", "--out", str(tmp_path / "val"), "--split", "val", "--classes", "cat,eel")
    want = np.flatnonzero((c.split == "val") & np.isin(c.labels, [0, 2]))
    assert r["rows"] == len(want) > 0 and r["filters"] == {"split": ["val"], "classes": ["cat", "eel"]}
    _assert_rows_equal(pq.read_table(tmp_path / "val" / "embeddings.parquet"), c, want)
    s = export_cache(cache, tmp_path / "none", "npy", split="none,test")
    want = np.flatnonzero(np.isin(c.split, ["", "test"]))
    assert s.rows == len(want)
    assert np.array_equal(np.load(tmp_path / "none" / "embeddings.npy"), c.embeddings[want])


@pytest.mark.parametrize("fmt,dtype", [("parquet", "float32"), ("npy", "float32"), ("parquet", "float16"), ("npy", "float16")])
def test_import_round_trip_is_equal_and_idempotent(cache, tmp_path, fmt, dtype):
    cache = cache if dtype == "float32" else _write_cache(tmp_path / "half.h5", dtype)
    c = load_cache(cache)
    export_cache(cache, tmp_path / "out", fmt, row_group_rows=70)
    r = import_cache(tmp_path / "out", tmp_path / "back.h5")
    assert (r.rows, r.cache_rows, r.format, r.provenance_from) == (len(c), len(c), fmt, "file")
    b = load_cache(tmp_path / "back.h5")
    assert b.paths.tolist() == c.paths.tolist() and b.labels.tolist() == c.labels.tolist() and b.split.tolist() == c.split.tolist()
    assert b.classes == c.classes and b.embeddings.dtype == c.embeddings.dtype and np.array_equal(b.embeddings, c.embeddings)
    recorded = dict(b.meta)
    imported = recorded.pop("imported")
    assert recorded == c.meta  # the provenance travelled whole
    assert imported["format"] == fmt and imported["overrides"] == {} and Path(imported["source"]).parent == tmp_path / "out"
    again = import_cache(tmp_path / "out", tmp_path / "back.h5")  # the same data again: rows replaced, never duplicated
    assert again.cache_rows == len(c)
    b2 = load_cache(tmp_path / "back.h5")
    assert b2.paths.tolist() == c.paths.tolist() and np.array_equal(b2.embeddings, c.embeddings)


def test_import_cli_overrides_are_recorded_and_another_backbone_is_refused(cache, tmp_path):
    export_cache(cache, tmp_path / "out", "parquet")
    r = cli_json("import", str(tmp_path / "out"), "--out", str(tmp_path / "x.h5"), "--model", "clip-vitl14", "--weights", "openai",
                 "--preprocessing", '{"resize_size": [224]}')
    assert r["provenance_from"] == "file + command line" and r["rows"] == 240
    meta = load_cache(tmp_path / "x.h5").meta
    assert (meta["model"], meta["weights"], meta["preprocessing"], meta["data_root"]) == ("clip-vitl14", "openai", {"resize_size": [224]}, "/data/pets")
    assert meta["imported"]["overrides"]["model"] == "clip-vitl14"
    proc = run_cli("import", str(tmp_path / "out"), "--out", str(tmp_path / "x.h5"))  # testnet rows into a clip-vitl14 cache
    assert proc.returncode == 5 and "model='clip-vitl14'" in proc.stderr.replace('"', "'")


def test_import_of_foreign_parquet_needs_model_and_takes_classes_from_the_class_column(tmp_path):
    df = pd.DataFrame({"image_path": ["b/1.jpg", "a/2.jpg", "a/3.jpg", "x.jpg"], "class": ["bird", "ant", "ant", None],
                       "embedding": [np.arange(4, dtype=np.float64) + i for i in range(4)]})  # pandas writes a variable-size list<double>
    df.to_parquet(tmp_path / "theirs.parquet")
    proc = run_cli("import", str(tmp_path / "theirs.parquet"), "--out", str(tmp_path / "t.h5"))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--model" in lines[0] and "theirs.parquet" in lines[0]
    r = import_cache(tmp_path / "theirs.parquet", tmp_path / "t.h5", model="their-net")
    assert r.provenance_from == "command line" and r.classes == ["ant", "bird"] and r.dtype == "float32"
    c = load_cache(tmp_path / "t.h5")
    assert c.paths.tolist() == ["a/2.jpg", "a/3.jpg", "b/1.jpg", "x.jpg"] and c.labels.tolist() == [0, 0, 1, -1]
    assert np.array_equal(c.embeddings[2], np.arange(4, dtype=np.float32)) and c.meta["model"] == "their-net" and c.meta["weights"] == "custom"


def _digits_cache(path: Path) -> Path:
    """Real data without a model: scikit-learn's 1,797 handwritten digits, their 64 pixels as the embedding."""
    from sklearn.datasets import load_digits

    d = load_digits()
    meta = new_cache_meta("pixels", 64, [str(i) for i in range(10)], data_root="/digits", layout="imagefolder")
    with CacheWriter.open(path, meta) as w:
        w.add_columns([f"{t}/{i:04d}.png" for i, t in enumerate(d.target)], d.data.astype(np.float32), labels=d.target)
    return path


def test_fit_head_on_the_imported_cache_matches_the_original(tmp_path):
    from pipeline.heads.fit import fit_head

    original = _digits_cache(tmp_path / "digits.h5")
    export_cache(original, tmp_path / "out", "npy")
    import_cache(tmp_path / "out", tmp_path / "imported.h5")
    a = fit_head(original, "logreg", tmp_path / "a.head.pt", plots=False, C=1.0)
    b = fit_head(tmp_path / "imported.h5", "logreg", tmp_path / "b.head.pt", plots=False, C=1.0)
    assert (a.n_train, a.n_val) == (b.n_train, b.n_val)
    assert a.metrics["val"]["accuracy"] == b.metrics["val"]["accuracy"] > 0.9


MEMORY_CHILD = textwrap.dedent("""
    import json, sys
    import pyarrow, pyarrow.compute, pyarrow.parquet
    from pipeline.exchange import export_cache

    def status(key):  # KiB. ru_maxrss would do, but Linux carries the parent's peak over fork and exec into it
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    small, big, out, fmt = sys.argv[1:5]
    export_cache(small, out + "-warm", "npy" if fmt == "npy" else "parquet")  # one-time costs (pyarrow's kernels, thread pools) count as the baseline
    base = status("VmRSS")  # the resident set now
    if fmt == "load_cache":  # the control: what the export must not do
        from pipeline import load_cache
        rows = len(load_cache(big))
    else:
        rows = export_cache(big, out, fmt).rows
    peak = status("VmHWM")  # the process's peak resident set since it started: an upper bound of the export's
    print(json.dumps({"grew_mib": (peak - base) / 1024, "base_mib": base / 1024, "peak_mib": peak / 1024, "rows": rows}))
""")



BIG_ROWS, BIG_DIM = 60_000, 1024  # 234 MiB of embeddings


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory) -> tuple[Path, Path]:
    """(a cache of 234 MiB of embeddings, a one-row cache of the same backbone)."""
    base = tmp_path_factory.mktemp("big")
    big, small = base / "big.h5", base / "small.h5"
    meta = new_cache_meta("m", BIG_DIM, ["a", "b"])
    rng = np.random.default_rng(0)
    with CacheWriter.open(big, meta) as w:
        for start in range(0, BIG_ROWS, 16_000):
            ids = np.arange(start, min(BIG_ROWS, start + 16_000))
            w.add_columns(np.char.mod("a/%07d.jpg", ids).astype("S"), rng.standard_normal((len(ids), BIG_DIM), dtype=np.float32), labels=ids % 2)
            w.commit()
    with CacheWriter.open(small, meta) as w:
        w.add_columns(["a/1.jpg"], np.zeros((1, BIG_DIM), np.float32), labels=[0])
    return big, small


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
@pytest.mark.parametrize("fmt", ["parquet", "npy", "load_cache"])
def test_export_memory_stays_bounded_for_a_cache_larger_than_the_bound(big_cache, tmp_path, fmt):
    """Peak RSS (VmHWM) of a child exporting 234 MiB of embeddings, over its resident set before
    (measured: parquet ~55 MiB, npy ~34 MiB on this project's machine); load_cache, the control,
    needs them all."""
    budget_mib = 80
    big, small = big_cache
    embeddings_mib = BIG_ROWS * BIG_DIM * 4 / 2**20
    assert embeddings_mib > 2 * budget_mib  # loading them whole could not stay under the bound
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(small), str(big), str(tmp_path / "out"), fmt], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["rows"] == BIG_ROWS
    if fmt == "load_cache":
        assert r["grew_mib"] > embeddings_mib  # the measurement sees a whole load
    else:
        assert r["grew_mib"] < budget_mib, f"export grew {r['grew_mib']:.0f} MiB over its baseline (bound {budget_mib} MiB): {r}"


def _one_error_line(proc, code: int, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_bad_inputs_are_one_clear_line(cache, tmp_path):
    not_cache = tmp_path / "notes.h5"
    not_cache.write_text("hello")
    _one_error_line(run_cli("export", str(not_cache), "--out", str(tmp_path / "o")), 5, "notes.h5")
    _one_error_line(run_cli("export", str(cache), "--out", str(tmp_path / "o"), "--classes", "cat,zebra"), 2, "'zebra'", "--classes", "dög")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_error_line(run_cli("export", str(cache), "--out", str(a_file)), 2, "--out", "file.txt", "is a file")
    _one_error_line(run_cli("export", str(cache), "--out", str(tmp_path / "o"), "--split", "holdout"), 2, "--split", "holdout")
    pq.write_table(pa.table({"path": ["a/1.jpg"], "vector": [[1.0, 2.0]]}), tmp_path / "noemb.parquet")
    _one_error_line(run_cli("import", str(tmp_path / "noemb.parquet"), "--out", str(tmp_path / "n.h5"), "--model", "m"), 2, "'embedding'",
                    "noemb.parquet", "vector")
    assert not (tmp_path / "n.h5").exists() and not (tmp_path / "o").exists()


def test_bad_rows_on_import_are_refused(tmp_path):
    base = {"path": ["a/1.jpg", "b/2.jpg"], "class": ["a", "b"], "embedding": [[1.0, 2.0], [3.0, 4.0]]}
    pq.write_table(pa.table({**base, "split": ["train", "holdout"]}), tmp_path / "split.parquet")
    with pytest.raises(DataError, match="split 'holdout'"):
        import_cache(tmp_path / "split.parquet", tmp_path / "c.h5", model="m")
    pq.write_table(pa.table(base), tmp_path / "ok.parquet")
    with pytest.raises(DataError, match="class 'b' is not among"):
        import_cache(tmp_path / "ok.parquet", tmp_path / "c.h5", model="m", classes="a,c")
    pq.write_table(pa.table({**base, "embedding": [[1.0, 2.0], [3.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(DataError, match="different lengths"):
        import_cache(tmp_path / "ragged.parquet", tmp_path / "c.h5", model="m")
    pq.write_table(pa.table({**base, "embedding": [[1.0, float("nan")], [3.0, 4.0]]}), tmp_path / "nan.parquet")
    with pytest.raises(DataError, match="NaN"):
        import_cache(tmp_path / "nan.parquet", tmp_path / "c.h5", model="m")
    assert not (tmp_path / "c.h5").exists()


def test_npy_rows_must_match_metadata(cache, tmp_path):
    export_cache(cache, tmp_path / "out", "npy")
    np.save(tmp_path / "out" / "embeddings.npy", np.zeros((3, DIM), np.float32))
    with pytest.raises(DataError, match="not one export"):
        import_cache(tmp_path / "out", tmp_path / "c.h5")
    (tmp_path / "out" / "metadata.parquet").unlink()  # what a kill between the renames would leave
    with pytest.raises(DataError, match="incomplete"):
        import_cache(tmp_path / "out", tmp_path / "c.h5")


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_a_failed_export_leaves_the_previous_one_untouched(cache, tmp_path, monkeypatch, fmt):
    import pipeline.exchange.export as export_mod

    out = tmp_path / "out"
    export_cache(cache, out, fmt, split="train")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / f".embeddings.{fmt}.tmp-999999999-dead").write_bytes(b"left by a killed export")
    real = export_mod.iter_embeddings

    def failing(table, rows, chunk):
        for i, item in enumerate(real(table, rows, chunk)):
            if i == 2:
                raise OSError(28, "No space left on device")
            yield item

    monkeypatch.setattr(export_mod, "iter_embeddings", failing)
    with pytest.raises(Exception, match="disk is full"):
        export_cache(cache, out, fmt, row_group_rows=20)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old export intact, no temporaries (the dead one removed too)


def test_missing_pyarrow_is_one_clear_line(cache, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UsageError) as err:
        export_cache(cache, tmp_path / "out", "parquet")
    assert str(err.value) == "export --format parquet needs pyarrow: pip install -e '.[parquet]'"
    with pytest.raises(UsageError, match=r"export --format npy \(for its metadata.parquet\) needs pyarrow"):
        export_cache(cache, tmp_path / "out", "npy")
    with pytest.raises(UsageError, match=r"^import needs pyarrow: pip install -e '\.\[parquet\]'$"):
        import_cache(tmp_path / "out", tmp_path / "c.h5", model="m")
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_refused_before_anything_is_written(cache, tmp_path, monkeypatch):
    import collections

    import pipeline.exchange.export as export_mod
    from pipeline.errors import StorageError

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export_mod.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 4096))
    with pytest.raises(StorageError, match="the disk is full") as err:
        export_cache(cache, tmp_path / "new" / "out", "parquet")
    assert err.value.exit_code == 6 and not (tmp_path / "new").exists()


@pytest.mark.parametrize("column, values, type_text", [
    ("path", [1, 2], "int64"),
    ("label", ["a", "b"], "string"),
    ("label", [True, False], "bool"),
    ("class", [1, 2], "int64"),
    ("split", [1.0, 2.0], "double"),
    ("embedding", [[1, 2], [3, 4]], "list<element: int64>"),
    ("embedding", [{"x": 1.0}, {"x": 2.0}], "struct<x: double>"),
])
def test_a_wrongly_typed_column_is_one_line_naming_file_column_and_types(tmp_path, column, values, type_text):
    table = {"path": ["a/1.jpg", "b/2.jpg"], "embedding": [[1.0, 2.0], [3.0, 4.0]], column: values}
    pq.write_table(pa.table(table), tmp_path / "typed.parquet")
    with pytest.raises(DataError) as err:
        import_cache(tmp_path / "typed.parquet", tmp_path / "c.h5", model="m", classes="a,b")
    message = str(err.value)
    assert "typed.parquet" in message and f"column {column!r} is {type_text}; it must be " in message and "\n" not in message
    assert not (tmp_path / "c.h5").exists()


def test_an_int64_path_column_is_exit_2_not_an_internal_error(tmp_path):
    pq.write_table(pa.table({"path": [1, 2], "embedding": [[1.0], [2.0]]}), tmp_path / "ids.parquet")
    npy = tmp_path / "npy"  # the npy layout's metadata.parquet is checked the same way
    npy.mkdir()
    np.save(npy / "embeddings.npy", np.ones((2, 1), np.float32))
    pq.write_table(pa.table({"path": [1, 2]}), npy / "metadata.parquet")
    for source in (tmp_path / "ids.parquet", npy):
        _one_error_line(run_cli("import", str(source), "--out", str(tmp_path / "c.h5"), "--model", "m"), 2,
                        "column 'path' is int64; it must be a string (the file's path relative to the data root)")


def test_labels_must_be_whole_class_indices_and_name_their_row(tmp_path):
    base = {"path": ["a.jpg", "b.jpg", "c.jpg"], "embedding": [[1.0], [2.0], [3.0]]}
    pq.write_table(pa.table({**base, "label": [0.0, None, 1.0]}), tmp_path / "gaps.parquet")  # pandas' integer column with a gap
    import_cache(tmp_path / "gaps.parquet", tmp_path / "g.h5", model="m", classes="x,y")
    assert load_cache(tmp_path / "g.h5").labels.tolist() == [0, -1, 1]
    pq.write_table(pa.table({**base, "label": [0.0, 0.5, 1.0]}), tmp_path / "half.parquet")
    with pytest.raises(DataError, match=r"half\.parquet' row 2: label 0\.5 is not a class index in -1\.\.1"):
        import_cache(tmp_path / "half.parquet", tmp_path / "h.h5", model="m", classes="x,y")


def test_a_path_listed_again_keeps_its_first_listing_as_a_manifest_does(tmp_path, monkeypatch):
    """One rule for repeated paths: the first listing is kept and each later one reported with
    its row (a manifest's words), across commits too; rows imported = rows held."""
    monkeypatch.setattr("pipeline.exchange.importing.COMMIT_BYTES", 8)  # one row per commit: repeats span commits
    pq.write_table(pa.table({"path": ["a/1.jpg", "a/1.jpg", "b/2.jpg", "a/1.jpg"], "class": ["ant", "bee", "bee", "cat"],
                             "embedding": [[float(i), 0.0] for i in range(4)]}), tmp_path / "rep.parquet")
    r = import_cache(tmp_path / "rep.parquet", tmp_path / "c.h5", model="m")
    assert (r.rows, r.cache_rows, r.source_rows) == (2, 2, 4)
    assert r.to_dict()["skipped"] == [{"path": "a/1.jpg", "reason": "rep.parquet row 2: listed again (first listing kept)"},
                                      {"path": "a/1.jpg", "reason": "rep.parquet row 4: listed again (first listing kept)"}]
    c = load_cache(tmp_path / "c.h5")
    assert c.paths.tolist() == ["a/1.jpg", "b/2.jpg"] and _class_names(c) == ["ant", "bee"] and c.embeddings[:, 0].tolist() == [0.0, 2.0]


@pytest.mark.parametrize("bad, needle", [
    ("a\x00b.jpg", "path 'a\\x00b.jpg' holds a NUL byte"),
    ("x" * 5_000_000, "is 5,000,000 bytes long; a path may have at most 4,096"),
    ("/data/a.jpg", "is absolute"),
    ("../a.jpg", "has a '..' component"),
    ("a//b.jpg", "write it as 'a/b.jpg'"),
    ("", "path '' is empty"),
])
def test_import_refuses_a_path_no_row_may_have_naming_its_row(tmp_path, bad, needle):
    pq.write_table(pa.table({"path": ["ok.jpg", bad], "embedding": [[1.0], [2.0]]}), tmp_path / "p.parquet")
    with pytest.raises(DataError) as err:
        import_cache(tmp_path / "p.parquet", tmp_path / "c.h5", model="m")
    message = str(err.value)
    assert "p.parquet' row 2: " in message and needle in message and "\n" not in message and len(message) < 600


def test_control_characters_and_a_manifests_outside_rows_round_trip(tmp_path):
    """Names a file system allows (a newline, an escape) go out and back in unchanged, and so
    does a manifest's row outside its folder (keyed by its absolute path); that same absolute
    row is refused where the data root is a folder."""
    meta = new_cache_meta("testnet", 2, ["new\nline", "tab\tclass"], weights="none", data_root="/data/m.csv", layout="manifest")
    with CacheWriter.open(tmp_path / "c.h5", meta) as w:
        w.add_columns(["a/new\nline.jpg", "b/\x1b[31mred.jpg", "/elsewhere/x.jpg"], np.arange(6, dtype=np.float32).reshape(3, 2), labels=[0, 1, 0])
    a = load_cache(tmp_path / "c.h5")
    for fmt in ("parquet", "npy"):
        export_cache(tmp_path / "c.h5", tmp_path / fmt, fmt)
        import_cache(tmp_path / fmt, tmp_path / f"{fmt}.h5")
        b = load_cache(tmp_path / f"{fmt}.h5")
        assert (b.paths.tolist(), b.classes, b.labels.tolist()) == (a.paths.tolist(), a.classes, a.labels.tolist())
        assert np.array_equal(b.embeddings, a.embeddings)
    with pytest.raises(DataError, match=r"row 1: path '/elsewhere/x\.jpg' is absolute"):
        import_cache(tmp_path / "parquet", tmp_path / "folder.h5", layout="imagefolder")
