"""Write a complete QDQ onnx_dir from an fp32 one: the chosen stages quantized (pipeline/npu/qdq.py), the others
copied, manifest.json updated (precision qdq-<scheme>, opset, graphs, fingerprint, how it was made).

Each stage's graphs keep the fp32 dir's layout: prefill/<stage>.onnx, decode/<stage>.onnx, the window graphs beside
them, their weights in one <stage>.data per mode folder (decode's a copy of prefill's, or a hard link with
link=True: less disk, but the onnx package >= 1.21 refuses to load weights from hard-linked files)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import numpy_helper

from pipeline.convert.onnx_builder import WeightStore
from pipeline.convert.onnx_dir import graph_spec, share_weights
from pipeline.convert.records import with_file_records
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.layout import MANIFEST, MODES, graph_set_window, weights_file
from pipeline.npu.folders import building, copy_into, copy_model_files
from pipeline.npu.qdq import SCHEMES, calibrate, prepared, quantize_graph, work_dir
from pipeline.npu.samples import RunFolderView, StageSample, pick, stage_samples
from pipeline.runtime.plan import window_for
from schemas.manifest import GraphSpec, Manifest, QuantizationSpec

INLINE_BYTES = 1024  # smaller initializers (scales, zero points, shapes) stay inside the graph


def copy_stage(src_dir: Path, m: Manifest, stage: str, out: Path, graph_hash, link: bool) -> dict[str, GraphSpec]:
    """A stage's graphs and weight files as they are; -> {graph set: spec}."""
    specs = {}
    for name, graphs in m.graphs.items():
        if stage in graphs:
            spec = graphs[stage]
            for rel in [spec.file, *spec.weights_files]:
                copy_into(src_dir, out, rel, link)
            graph_hash.update((src_dir / spec.file).read_bytes())
            specs[name] = spec
    return specs


def calibration_graphs(m: Manifest, stage: str, samples: dict[str, list[StageSample]]) -> dict[str, str]:
    """mode -> the graph set to calibrate it on: for blocks the smallest window that holds every sample (the same
    tensor names as every other window's graph, less attention work)."""
    out = {}
    for mode, group in samples.items():
        if group and stage.startswith("block"):
            window = window_for(m, max(s.meta.next_past_len for s in group))
            out[mode] = next(n for n in m.graphs if n.split("_c")[0] == mode and
                             graph_set_window(n, m.max_cache_len) == window)
        elif group:
            out[mode] = mode
    return out


def save_graph(model: onnx.ModelProto, out: Path, rel: str, store: WeightStore) -> GraphSpec:
    """The graph at out/rel, its large initializers in the store's weights file (each tensor once)."""
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise StagepipeError(f"{rel}: initializer {t.name} was not loaded")
        if not t.raw_data:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
        if len(t.raw_data) >= INLINE_BYTES:
            t.CopyFrom(store.add_raw(t))
    (out / rel).write_bytes(model.SerializeToString())
    return graph_spec(model, rel)


def quantize_stage(src_dir: Path, m: Manifest, stage: str, runs: list[RunFolderView], scheme_name: str,
                   keep_float: list[str], max_samples: int, seed: int, out: Path, graph_hash, link: bool,
                   log) -> tuple[dict, int]:
    """Every graph of the stage quantized from one calibration; -> ({graph set: spec}, samples calibrated on)."""
    scheme = SCHEMES[scheme_name]
    every = stage_samples(runs, stage, len(m.blocks))
    samples = {mode: pick([s for s in every if s.mode == mode], max_samples, seed) for mode in MODES}
    calib = calibration_graphs(m, stage, samples)
    if not calib:
        raise StagepipeError(f"no step of the calibration runs ran {stage}; finish the runs first")
    store = WeightStore(out / MODES[0])
    store.open(Path(weights_file(MODES[0], stage)).name)
    specs = {}
    with work_dir() as tmp:
        work = Path(tmp)
        graphs = {name: graphs[stage] for name, graphs in m.graphs.items() if stage in graphs}
        ready = {name: prepared(src_dir / spec.file, scheme, work / f"{name}.onnx") for name, spec in graphs.items()}
        cache = calibrate({mode: ready[name] for mode, name in calib.items()}, samples,
                          {mode: graphs[name] for mode, name in calib.items()}, m, work)
        weights = {}  # the stage's quantized weights, one set for all its graphs
        for name, spec in graphs.items():
            model = quantize_graph(ready[name], cache, scheme, keep_float, work / f"{name}-qdq.onnx", weights)
            odd = {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
            if odd:
                raise StagepipeError(f"{stage}: quantization made non-standard ops {sorted(odd)}")
            specs[name] = save_graph(model, out, spec.file, store)
            graph_hash.update((out / spec.file).read_bytes())
            log(f"  {spec.file}: {scheme_name}")
    store.close()
    graph_hash.update(store.hasher.digest())
    share_weights(out / weights_file(MODES[0], stage), out / weights_file(MODES[1], stage), copy=not link)
    return specs, sum(map(len, samples.values()))


def write_qdq_dir(src_dir: Path, runs: list[RunFolderView], scheme_name: str, out: Path, stages: list[str],
                  keep_float: list[str], max_samples: int = 64, seed: int = 0, link: bool = False,
                  log=print) -> Manifest:
    from pipeline.core.jsonfile import load_manifest

    m = load_manifest(src_dir)
    if m.precision != "fp32":
        raise StagepipeError(f"--onnx_dir {src_dir}: its graphs are {m.precision}; quantize fp32 graphs")
    if scheme_name not in SCHEMES:
        raise StagepipeError(f"--scheme {scheme_name}: choose one of {', '.join(SCHEMES)}")
    graph_hash = hashlib.sha256(m.graphs_fingerprint.encode())
    graphs: dict[str, dict[str, GraphSpec]] = {name: {} for name in m.graphs}
    made, counts = {}, {}
    with building(out, MANIFEST, "an onnx_dir", MODES) as tmp:
        for stage in m.stage_names():
            if stage in stages:
                log(f"{stage}: calibrating and quantizing ({scheme_name}) ...")
                specs, counts[stage] = quantize_stage(src_dir, m, stage, runs, scheme_name, keep_float, max_samples,
                                                      seed, tmp, graph_hash, link, log)
                made[stage] = scheme_name
            else:
                specs, made[stage] = copy_stage(src_dir, m, stage, tmp, graph_hash, link), m.precision
            for name, spec in specs.items():
                graphs[name][stage] = spec
        copy_model_files(src_dir, tmp, m)
        quantized = [s for s in m.stage_names() if s in stages]
        manifest = m.model_copy(update={
            "precision": f"qdq-{scheme_name}", "graphs": graphs, "graphs_fingerprint": graph_hash.hexdigest(),
            "opset": max(m.opset, SCHEMES[scheme_name].opset) if quantized else m.opset,
            "quantization": QuantizationSpec(scheme=scheme_name, source_fingerprint=m.graphs_fingerprint,
                                             stages=made, keep_float=list(keep_float),
                                             calibration_runs=[str(r.dir.resolve()) for r in runs],
                                             calibration_samples=counts)})
        manifest = with_file_records(manifest, tmp)  # its own files, not the source's records
        write_text(tmp / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest


def onnx_dir_bytes(onnx_dir: Path) -> int:
    """The size of an onnx_dir's model: its graphs and weight files, a weights file of one name in both mode
    folders (decode's is a copy or link of prefill's) counted once."""
    total, data = 0, {}
    for path in Path(onnx_dir).rglob("*"):
        if path.suffix == ".onnx" and path.is_file():
            total += path.stat().st_size
        elif path.suffix == ".data" and path.is_file():
            data[path.name] = path.stat().st_size
    return total + sum(data.values())
