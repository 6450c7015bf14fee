"""Write an onnx_dir: the converter's whole job, from a checkpoint to manifest.json and the graphs, without torch.

The folder is built beside its target and renamed into place at the end, so it is never half-written; the
hidden folders a killed conversion leaves there are removed by the next one. The manifest records every file
written (size, mtime, sha256), so that a run can check the graphs it opens (pipeline.runtime.graph_files)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from pipeline import __version__
from pipeline.checkpoint.model_config import load_model_config
from pipeline.checkpoint.safetensors_io import CheckpointWeights
from pipeline.convert.graphs import GRAPH_FORMAT, GraphShape, Precision, build_block, build_embed, build_output
from pipeline.convert.onnx_builder import OPSET, WeightStore
from pipeline.convert.options import PRECISIONS, ConvertOptions
from pipeline.convert.records import file_records, graph_paths
from pipeline.convert.source import WeightSource, check_checkpoint, source_files, source_fingerprint, source_stat
from pipeline.convert.vision_dir import checked_vision_config, write_vision_graphs
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError
from pipeline.core.tensors import sha256_file
from pipeline.core.layout import (GENERATION_CONFIG, MANIFEST, MODEL_CONFIG, MODES, PREPROCESSOR_CONFIG,
                                  TOKENIZER_FILES, graph_file, graph_set, weights_file)
from schemas.manifest import BlockSpec, GraphSpec, Manifest, TensorSpec

MASK_VALUE = -10000.0  # finite: fits float16 and keeps a fully masked softmax row finite


def _tensor_specs(values) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append(TensorSpec(name=v.name, shape=[d.dim_value for d in t.shape.dim],
                              dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


def graph_spec(model: onnx.ModelProto, rel_file: str) -> GraphSpec:
    mode_dir = rel_file.split("/")[0]
    files = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return GraphSpec(file=rel_file, weights_files=[f"{mode_dir}/{f}" for f in files],
                     inputs=_tensor_specs(model.graph.input), outputs=_tensor_specs(model.graph.output))


def share_weights(src: Path, dst: Path, copy: bool):
    """Prefill and decode graphs share one weights file on disk through a hard link: onnxruntime refuses
    external data outside a graph's folder, so a '../' path cannot do it. onnx >= 1.21 in turn refuses to load
    weights from a file with several links (load_external_data=False still works): --copy_weights is for tools
    that load weights with it."""
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def convert(model_path, onnx_dir, log=print, **settings) -> Manifest:
    """Convert model_path into onnx_dir; settings are ConvertOptions fields (blocks=2, max_input_len=8, ...)."""
    options = ConvertOptions(model_path=Path(model_path), onnx_dir=Path(onnx_dir), **settings)
    return convert_with(options, log)


def convert_with(options: ConvertOptions, log=print) -> Manifest:
    o = options.checked()
    model_path, onnx_dir = Path(o.model_path), Path(o.onnx_dir)
    config = load_model_config(model_path)
    ranges = o.layer_ranges(config.num_layers)
    weights = CheckpointWeights(model_path)
    check_checkpoint(config, weights)
    vision = checked_vision_config(model_path, weights, o)
    if onnx_dir.exists() and any(onnx_dir.iterdir()) and not (onnx_dir / MANIFEST).exists():
        raise StagepipeError(f"--onnx_dir {onnx_dir} exists and is not a stagepipe onnx_dir; "
                             "choose an empty or new folder")

    started = time.perf_counter()
    if onnx_dir.is_symlink():  # the link stays; the folder it points to is replaced
        onnx_dir = onnx_dir.resolve()
    onnx_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(onnx_dir, log)
    tmp = onnx_dir.parent / f".{onnx_dir.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _write_onnx_dir(config, ranges, weights, tmp, o, log, vision)
        replace_dir(tmp, onnx_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"converted {model_path} -> {onnx_dir} in {time.perf_counter() - started:.1f}s")
    return manifest


def _graph_sets(max_input_len: int, max_cache_len: int, windows: list[int], cache_input: str = "whole",
                rope_input: bool = False):
    """-> [(graph set, mode, shape)]: the full-cache sets (every stage) first, then one per smaller window
    (block graphs only), whose cache inputs hold the whole cache or (cache_input "window") their W slots."""
    C = max_cache_len if cache_input == "whole" else 0
    return [(graph_set(mode, w, max_cache_len), mode, GraphShape(T=T, W=w, C=C, rope_input=rope_input))
            for w in sorted(windows, reverse=True) for mode, T in zip(MODES, (max_input_len, 1))]


def _write_onnx_dir(config, ranges, weights, out: Path, o: ConvertOptions, log, vision=None) -> Manifest:
    model_path, C = Path(o.model_path), o.max_cache_len
    for mode in MODES:
        (out / mode).mkdir(parents=True)
    prec = Precision(compute=np.dtype(np.float16 if o.precision == "fp16" else np.float32), kv=np.dtype(o.kv_dtype),
                     weight_bits=PRECISIONS[o.precision])
    graph_sets = _graph_sets(o.max_input_len, C, o.cache_windows, o.cache_input, o.rope_input)
    store = WeightStore(out / MODES[0])
    lookup = WeightSource(weights, store)
    builders = {"embed": lambda shape: build_embed(config, prec, shape, lookup)}
    for b, (start, end) in enumerate(ranges):
        builders[f"block{b}"] = lambda shape, r=range(start, end): build_block(config, prec, shape, r, lookup)
    builders["output"] = lambda shape: build_output(config, prec, shape, lookup)

    graphs: dict[str, dict[str, GraphSpec]] = {name: {} for name, *_ in graph_sets}
    graph_hash = hashlib.sha256()
    written: dict[str, str] = {}  # file in the onnx_dir -> sha256
    nonstandard: set[str] = set()
    sets_of = {stage: [gs for gs in graph_sets if stage.startswith("block") or gs[0] == gs[1]] for stage in builders}
    total, done = sum(map(len, sets_of.values())), 0
    for stage, build in builders.items():
        store.open(Path(weights_file(MODES[0], stage)).name)
        for name, mode, shape in sets_of[stage]:
            t0 = time.perf_counter()
            model = build(shape)
            # a window's graphs sit beside the full-cache ones and read the same <stage>.data
            rel = graph_file(mode, stage, shape.W, C)
            data = model.SerializeToString()
            (out / rel).write_bytes(data)
            graph_hash.update(data)
            written[rel] = hashlib.sha256(data).hexdigest()
            graphs[name][stage] = graph_spec(model, rel)
            nonstandard |= {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
            done += 1
            log(f"[{done}/{total}] {rel} ({time.perf_counter() - t0:.1f}s)")
        store.close()
        share_weights(out / weights_file(MODES[0], stage), out / weights_file(MODES[1], stage), o.copy_weights)
        for mode in MODES:
            written[weights_file(mode, stage)] = store.file_digests[Path(weights_file(MODES[0], stage)).name]
    graph_hash.update(store.hasher.digest())
    vision_spec = vision and write_vision_graphs(vision, weights, out, o, MASK_VALUE, graph_hash, log)

    copied = []
    for name in (MODEL_CONFIG, GENERATION_CONFIG, PREPROCESSOR_CONFIG) + TOKENIZER_FILES:
        if (model_path / name).exists():
            shutil.copyfile(model_path / name, out / name)
            copied.append(name)
    files = source_files(model_path, weights)
    manifest = Manifest(
        stagepipe_version=__version__, graph_format=GRAPH_FORMAT, model=config, precision=o.precision,
        kv_dtype=o.kv_dtype, max_input_len=o.max_input_len, max_cache_len=C, cache_windows=o.cache_windows,
        cache_input=o.cache_input, rope_input=o.rope_input, mask_value=MASK_VALUE,
        opset=OPSET,
        blocks=[BlockSpec(index=i, layer_start=s, layer_end=e) for i, (s, e) in enumerate(ranges)],
        graphs=graphs, source_path=str(model_path.resolve()), source_files=source_stat(files),
        source_fingerprint=source_fingerprint(files), graphs_fingerprint=graph_hash.hexdigest(),
        tokenizer_files=[n for n in copied if n in TOKENIZER_FILES],
        nonstandard_ops=sorted(nonstandard), vision=vision_spec)
    # digests taken while writing; the vision graphs' files are read back
    digests = {rel: written.get(rel) or sha256_file(out / rel) for rel in graph_paths(manifest)}
    manifest = manifest.model_copy(update={"files": file_records(out, digests)})
    write_text(out / MANIFEST, manifest.model_dump_json(indent=2) + "\n")
    return manifest


_LEFTOVER = r"\.{name}\.(?:converting|old)-(\d+)"


def remove_leftovers(onnx_dir: Path, log=print):
    """Remove the hidden folders conversions of onnx_dir left beside it when killed (.NAME.converting-PID,
    .NAME.old-PID), once the process that made them is gone."""
    pattern = re.compile(_LEFTOVER.format(name=re.escape(onnx_dir.name)))
    if not onnx_dir.parent.is_dir():
        return
    for path in onnx_dir.parent.iterdir():
        found = pattern.fullmatch(path.name)
        if found and path.is_dir() and not path.is_symlink() and not _process_alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            log(f"removed {path}, left by an interrupted conversion")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own leftover, from an earlier conversion that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def replace_dir(new: Path, target: Path):
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
