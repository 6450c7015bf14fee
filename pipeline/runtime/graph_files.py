"""Before a graph is opened: its files are the ones the converter wrote (manifest.json `files`: size, mtime,
sha256). A swapped, edited or truncated graph or weights file is one error line, never other tokens.

Graphs (.onnx, weights outside) are small and hashed whenever a run opens them. A weights file is hashed only
when its size or mtime differs from the record, so a 2 GB file is not reread every run (a copied onnx_dir
whose files got new mtimes is hashed once per run; reconverting records them again).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.tensors import sha256_file
from schemas.manifest import Manifest

FIX = ("the onnx_dir changed after conversion: reconvert it or restore the file (changed on purpose? "
       "python -m pipeline.convert.records ONNX_DIR)")


class GraphFiles:
    """Checks each file of an onnx_dir once per process, before it is used."""

    def __init__(self, onnx_dir: Path, manifest: Manifest):
        self.onnx_dir, self.manifest = Path(onnx_dir), manifest
        self._checked: set[str] = set()
        self._noted = False

    def check(self, rel: str):
        if rel in self._checked:
            return
        if not self.manifest.files:
            if not self._noted:
                print(f"note: {self.onnx_dir}: manifest.json records no file digests (converted by an older "
                      "stagepipe); its graphs are not checked: reconvert to have them checked", file=sys.stderr)
                self._noted = True
            return
        path, record = self.onnx_dir / rel, self.manifest.files.get(rel)
        if record is None:
            raise StagepipeError(f"{path}: not among the files manifest.json records; {FIX}")
        try:
            st = os.stat(path)
        except OSError as e:
            raise StagepipeError(f"{path}: {e.strerror.lower()}; {FIX}") from None
        if st.st_size != record.size:
            raise StagepipeError(f"{path}: has {st.st_size} bytes, manifest.json records {record.size}; {FIX}")
        if (rel.endswith(".onnx") or st.st_mtime_ns != record.mtime_ns) and sha256_file(path) != record.sha256:
            raise StagepipeError(f"{path}: its content differs from what the converter wrote (sha256); {FIX}")
        self._checked.add(rel)
