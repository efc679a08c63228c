"""Thumbnails of cached rows as ``data:`` URIs, read from the data the cache recorded.

Folder layouts are read directly (data root / relative path); manifests, tar shards and
datasets are scanned once (on the first thumbnail) to find each row's record, then read
with the reader's own ``read_record``. A file that is gone or cannot be decoded gives no
thumbnail (the report draws a placeholder) and is listed with its reason: the report never
fails for a missing image.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..images import DecodeError, ImageRecord, decode_image, read_record, scan_source

FOLDER_LAYOUTS = ("imagefolder", "split", "flat")


class Thumbnails:
    """``uri(relpath)``: a JPEG thumbnail (longest side ``size``) as a data URI, or None."""

    def __init__(self, meta: dict[str, Any], size: int = 96, quality: int = 85):
        self.data_root = str(meta.get("data_root") or "")
        self.layout = str(meta.get("layout") or "auto")
        self.columns = meta.get("manifest_columns")
        self.size, self.quality = size, quality
        self._uris: dict[str, str | None] = {}
        self._records: dict[str, tuple[Path, ImageRecord]] | None = None
        self._scan_problem: str | None = None
        self.missing: dict[str, str] = {}  # relpath -> why there is no thumbnail

    @property
    def made(self) -> int:
        """Thumbnails encoded so far."""
        return sum(u is not None for u in self._uris.values())

    def uri(self, relpath: str) -> str | None:
        relpath = str(relpath)
        if relpath not in self._uris:
            try:
                self._uris[relpath] = self._encode(decode_image(self._read(relpath), draft_size=self.size))
            except (DecodeError, DataError) as exc:
                self._uris[relpath] = None
                self.missing[relpath] = str(exc)
        return self._uris[relpath]

    def _read(self, relpath: str) -> bytes:
        if not self.data_root:
            raise DataError("the cache records no data folder")
        if self.layout in FOLDER_LAYOUTS:
            return read_record(Path(self.data_root), ImageRecord(relpath, -1, "", 0, 0))
        if self._records is None:
            self._scan()
        if self._scan_problem:
            raise DataError(self._scan_problem)
        found = self._records.get(relpath)
        if found is None:
            raise DataError("no longer in the data source")
        root, record = found
        return read_record(root, record)

    def _scan(self) -> None:
        try:
            scan = scan_source(self.data_root, self.layout, self.columns)
            self._records = {r.relpath: (scan.root, r) for r in scan.records}
        except DataError as exc:
            self._records, self._scan_problem = {}, f"the data source cannot be read: {exc}"

    def _encode(self, image) -> str:
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=self.quality)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
