"""The layering the README's Layout promises: lower layers never import higher ones
(import-linter's contract in pyproject.toml), and a package is used through its front
(``from ..store import X``), never through another package's modules."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def imports_into_other_packages(package: str) -> list[str]:
    """``importer line: text`` for each import of a module inside another subpackage of ``package``."""
    graph = grimp.build_graph(package)
    subpackages = {m.split(".")[1] for m in graph.modules if m.count(".") == 2}
    found = []
    for importer in sorted(graph.modules):
        own = importer.split(".")[1] if importer.count(".") else ""
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            parts = imported.split(".")
            if len(parts) >= 3 and parts[1] in subpackages and parts[1] != own:
                for d in graph.get_import_details(importer=importer, imported=imported):
                    name = d["line_contents"].rsplit(" import ", 1)[-1]
                    if parts[-1] not in [n.strip() for n in name.split(",")]:  # `from ..quality import advice` names the function, not the module
                        found.append(f"{importer}:{d['line_number']}: {d['line_contents']}")
    return found


def test_packages_are_used_through_their_fronts():
    assert imports_into_other_packages("pipeline") == []


def test_the_check_finds_an_import_of_another_package_s_module(tmp_path, monkeypatch):
    pkg = tmp_path / "layered"
    for sub in ("low", "high"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "inner.py").write_text("X = 1\n")
    (pkg / "high" / "uses.py").write_text("from ..low.inner import X\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert imports_into_other_packages("layered") == ["layered.high.uses:1: from ..low.inner import X"]


def test_the_layers_contract_holds():
    """pyproject.toml's contract, as `lint-imports` (import-linter, a test dependency) checks it in CI."""
    proc = subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
