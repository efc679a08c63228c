"""Editing a sealed store file in a test as a writer of that content would have written it
(a newer featcache's schema version, a foreign attribute): the edit is applied to a copy made
through the store's own writer, so the result carries a valid seal."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py

from pipeline.store.h5files import new_hdf5


def rewrite_sealed(path: Path, edit: Callable[[h5py.File], None], manifest: bool = True) -> None:
    """Copy every object and attribute of the HDF5 file at ``path`` into a new sealed file,
    apply ``edit`` to the copy, and put it in place (``manifest=False`` for a part file)."""
    path = Path(path)
    with h5py.File(path, "r") as src, new_hdf5(path, 4 * path.stat().st_size + (1 << 20), chunks_outside_frame=not manifest) as (dst, _):
        dst.attrs.update(dict(src.attrs))
        for name in src:
            src.copy(src[name], dst, name=name)
        edit(dst)


def unseal_cache(path: Path) -> None:
    """Rewrite the cache at ``path`` as featcache wrote caches before seals: plain HDF5 parts
    and manifest (no user block), the manifest listing each part's whole-file SHA-256 and no
    frame digests."""
    import hashlib

    import numpy as np

    from pipeline.store.schema import parts_dir_for

    def plain_copy(file: Path, edit: Callable[[h5py.File], None] = lambda f: None) -> None:
        tmp = file.with_name(file.name + ".plain")
        with h5py.File(file, "r") as src, h5py.File(tmp, "w", libver="latest") as dst:
            dst.attrs.update(dict(src.attrs))
            for name in src:
                src.copy(src[name], dst, name=name)
            edit(dst)
        tmp.replace(file)

    digests = {}
    for part in sorted(parts_dir_for(path).glob("part-*.h5")):
        plain_copy(part)
        digests[part.name] = (hashlib.sha256(part.read_bytes()).hexdigest(), part.stat().st_size)

    def relist(f: h5py.File) -> None:
        g = f["parts"]
        names = [n.decode() for n in g["name"][...].tolist()]
        del g["frame"], g["sha256"], g["bytes"]
        g["sha256"] = np.array([digests[n][0].encode() for n in names], dtype="S64") if names else np.zeros(0, "S1")
        g["bytes"] = np.array([digests[n][1] for n in names], dtype=np.int64)

    plain_copy(path, relist)
