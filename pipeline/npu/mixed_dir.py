"""An onnx_dir made of other onnx_dirs' stages: each stage's graphs and weights copied from the dir its label
names (python -m pipeline.mixed writes one for the assignment it chooses).

Weight files are renamed <mode>/<label>-<file> in the copy (graphs rewritten to match), so two sources' files of one
name never collide and a file two stages of one source share (a tied embedding) stays one file."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

from pipeline.convert.onnx_dir import graph_spec
from pipeline.convert.records import with_file_records
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import MANIFEST, MODES
from pipeline.npu.folders import building, copy_into, copy_model_files
from pipeline.runtime.compat import why_not_interchangeable
from pipeline.runtime.plan import hidden_dtype
from schemas.manifest import GraphSpec, Manifest, QuantizationSpec


def check_sources(reference: Manifest, sources: dict[str, tuple[Path, Manifest]]):
    """Every source must hold the reference's model, split, T, C and windows, and keep hidden states and the KV
    cache in the same dtypes (a mixed onnx_dir has one cache)."""
    for label, (path, m) in sources.items():
        why = why_not_interchangeable(reference, m)
        if why:
            raise StagepipeError(f"--onnx_dirs {label}={path}: {why}")
        if (hidden_dtype(m), m.kv_dtype) != (hidden_dtype(reference), reference.kv_dtype):
            raise StagepipeError(f"--onnx_dirs {label}={path}: passes {hidden_dtype(m)} hidden states and keeps a "
                                 f"{m.kv_dtype} cache, the others {hidden_dtype(reference)}/{reference.kv_dtype}; "
                                 "mix onnx_dirs converted with the same hidden and KV dtypes")


def copy_stage_renamed(src: Path, m: Manifest, stage: str, label: str, out: Path, link: bool) -> dict[str, GraphSpec]:
    specs = {}
    for name, graphs in m.graphs.items():
        if stage not in graphs:
            continue
        spec = graphs[stage]
        model = onnx.load(str(src / spec.file), load_external_data=False)
        for t in model.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = f"{label}-{entry.value}"
        for rel in spec.weights_files:
            mode, file = rel.split("/")
            renamed = out / mode / f"{label}-{file}"
            if not renamed.exists():
                copy_into(src, out, rel, link)
                os.replace(out / rel, renamed)
        (out / spec.file).write_bytes(model.SerializeToString())
        specs[name] = graph_spec(model, spec.file)
    return specs


def write_mixed_dir(reference_dir: Path, sources: dict[str, tuple[Path, Manifest]], assignment: dict[str, str],
                    out: Path, link: bool = False) -> Manifest:
    from pipeline.core.jsonfile import load_manifest

    ref = load_manifest(reference_dir)
    with building(out, MANIFEST, "an onnx_dir", MODES) as tmp:
        graphs: dict[str, dict[str, GraphSpec]] = {name: {} for name in ref.graphs}
        identity = hashlib.sha256()
        for stage in ref.stage_names():
            label = assignment[stage]
            src, m = sources[label]
            for name, spec in copy_stage_renamed(src, m, stage, label, tmp, link).items():
                graphs[name][stage] = spec
            identity.update(f"{stage}={m.graphs_fingerprint};".encode())
        copy_model_files(reference_dir, tmp, ref)
        used = [sources[assignment[s]][1] for s in ref.stage_names()]
        manifest = ref.model_copy(update={
            "precision": "mixed", "graphs": graphs, "graphs_fingerprint": identity.hexdigest(),
            "opset": max(m.opset for m in used),
            "nonstandard_ops": sorted({op for m in used for op in m.nonstandard_ops}),
            "quantization": QuantizationSpec(scheme="mixed", source_fingerprint=ref.graphs_fingerprint,
                                             stages={s: f"{assignment[s]} ({sources[assignment[s]][1].precision})"
                                                     for s in ref.stage_names()})})
        manifest = with_file_records(manifest, tmp)  # its own files, not the source's records
        write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest
