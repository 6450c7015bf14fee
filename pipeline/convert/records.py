"""manifest.json's record of the files an onnx_dir holds (size, mtime, sha256), which a run checks the graphs it
opens against (pipeline.runtime.graph_files).

    python -m pipeline.convert.records ONNX_DIR     # after changing graphs or weights on purpose

Recording an onnx_dir changed by hand (a weights file edited by your own tool, a graph replaced) also gives it a
new graphs fingerprint, so runs and KV caches made with the old files are told apart (--reset_kv or a new run
folder), never silently mixed with the new ones.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from pipeline.core.atomic import write_text
from pipeline.core.errors import cli_entry
from pipeline.core.jsonfile import load_manifest
from pipeline.core.layout import MANIFEST
from pipeline.core.tensors import sha256_file
from schemas.manifest import Manifest, WrittenFile


def file_records(onnx_dir: Path, digests: dict[str, str]) -> dict[str, WrittenFile]:
    """{path in the onnx_dir: its size, mtime and the given sha256}."""
    records = {}
    for rel, sha in sorted(digests.items()):
        st = (Path(onnx_dir) / rel).stat()
        records[rel] = WrittenFile(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha)
    return records


def graph_paths(manifest: Manifest) -> list[str]:
    """Every graph and weights file the manifest's graphs name (a VL model's vision graphs included)."""
    specs = [g for stages in manifest.graphs.values() for g in stages.values()]
    specs += list(manifest.vision.graphs.values()) if manifest.vision else []
    return sorted({p for g in specs for p in (g.file, *g.weights_files)})


def with_file_records(manifest: Manifest, onnx_dir: Path) -> Manifest:
    """The manifest with `files` recording the graphs and weights its graphs name, as they are in onnx_dir (for
    tools that make an onnx_dir out of others': the records they copied are the sources')."""
    paths = graph_paths(manifest)
    return manifest.model_copy(update={"files": file_records(onnx_dir, {p: sha256_file(Path(onnx_dir) / p)
                                                                        for p in paths})})


def record(onnx_dir: Path) -> tuple[Manifest, Manifest]:
    """Hash the onnx_dir's files again and rewrite its manifest.json. -> (old, new manifest)."""
    onnx_dir = Path(onnx_dir)
    old = load_manifest(onnx_dir)
    records = with_file_records(old, onnx_dir).files
    unchanged = {rel: r.sha256 for rel, r in records.items()} == {rel: r.sha256 for rel, r in old.files.items()}
    fingerprint = old.graphs_fingerprint if unchanged else hashlib.sha256(
        "".join(f"{rel}:{r.sha256}\n" for rel, r in records.items()).encode()).hexdigest()
    new = old.model_copy(update={"files": records, "graphs_fingerprint": fingerprint})
    write_text(onnx_dir / MANIFEST, new.model_dump_json(indent=2) + "\n")
    return old, new


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.convert.records", description=__doc__.split("\n")[0])
    p.add_argument("onnx_dir", type=Path)
    a = p.parse_args(argv)
    old, new = record(a.onnx_dir)
    if old.graphs_fingerprint == new.graphs_fingerprint:
        print(f"{a.onnx_dir}: {len(new.files)} files recorded; the graphs are as converted")
    else:
        print(f"{a.onnx_dir}: {len(new.files)} files recorded; graphs fingerprint {old.graphs_fingerprint[:12]} -> "
              f"{new.graphs_fingerprint[:12]} (runs made with the old files need --reset_kv or a new run folder)")


if __name__ == "__main__":
    main()
