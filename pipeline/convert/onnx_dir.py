"""Convert a Qwen2/Qwen3 HuggingFace checkpoint into split static-shape ONNX graphs, without torch.

    python -m pipeline.convert --model_path CKPT --onnx_dir OUT [--blocks 4 | --layer_split 7,7,7,7]
        [--max_input_len 16] [--max_cache_len 1024] [--cache_windows auto|none|128,256,512]
        [--precision fp32|fp16|int8|int4] [--kv_dtype auto|float16|float32]

Writes OUT/manifest.json, the checkpoint's config and tokenizer files, and prefill/ + decode/ graphs: every
stage at the full cache (C slots), plus block graphs for smaller attention windows (block0_c128.onnx, ...).
The whole folder is built beside OUT and renamed into place at the end, so OUT is never half-written.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from pipeline import __version__
from pipeline.core.atomic import write_text
from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.convert.graphs import GRAPH_FORMAT, GraphShape, Precision, build_block, build_embed, build_output
from pipeline.runtime.plan import graph_set
from pipeline.checkpoint.model_config import load_model_config, split_layers
from pipeline.convert.onnx_builder import OPSET, WeightStore
from pipeline.convert.quantize import block_size_for, quantize_rows
from pipeline.checkpoint.safetensors_io import CheckpointWeights, bf16_bits_to_f32
from schemas.manifest import BlockSpec, GraphSpec, Manifest, ModelConfig, SourceFile, TensorSpec

MASK_VALUE = -10000.0  # finite: fits float16 and keeps a fully masked softmax row finite
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
CHUNK_BYTES = 32 << 20
# precision -> weight bits: fp32/fp16 use standard ops only; int8/int4 are weight-only quantized linear layers
# (onnxruntime's com.microsoft MatMulNBits, for CPU targets), activations stay float32.
PRECISIONS = {"fp32": 0, "fp16": 0, "int8": 8, "int4": 4}  # convert big tables this many bytes at a time, so memory stays flat


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the graphs read, with the shape it must have."""
    H, D, I = c.hidden_size, c.head_dim, c.intermediate_size
    q_out, kv_out = c.num_attention_heads * D, c.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (c.vocab_size, H), "model.norm.weight": (H,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, H)
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.self_attn.q_proj.weight": (q_out, H), f"{p}.self_attn.k_proj.weight": (kv_out, H),
                       f"{p}.self_attn.v_proj.weight": (kv_out, H), f"{p}.self_attn.o_proj.weight": (H, q_out),
                       f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H),
                       f"{p}.mlp.down_proj.weight": (H, I)})
        if c.qkv_bias:
            shapes.update({f"{p}.self_attn.q_proj.bias": (q_out,), f"{p}.self_attn.k_proj.bias": (kv_out,),
                           f"{p}.self_attn.v_proj.bias": (kv_out,)})
        if c.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (H,)
        if c.qk_norm:
            shapes.update({f"{p}.self_attn.q_norm.weight": (D,), f"{p}.self_attn.k_norm.weight": (D,)})
    return shapes


def check_checkpoint(config: ModelConfig, weights: CheckpointWeights):
    for name, shape in expected_tensors(config).items():
        if not weights.has(name):
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' is missing from the checkpoint; "
                                 "is it a complete Qwen2/Qwen3 causal-LM checkpoint?")
        if weights.shape(name) != shape:
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' has shape {list(weights.shape(name))}, "
                                 f"config.json implies {list(shape)}; config and weights do not match")
        if weights.dtype(name) not in ("BF16", "F16", "F32"):
            raise StagepipeError(f"{weights.model_dir}: tensor '{name}' is {weights.dtype(name)}; "
                                 "only bfloat16, float16 and float32 checkpoints are supported")


def source_files(model_dir: Path, weights: CheckpointWeights) -> list[Path]:
    extra = [model_dir / n for n in ("config.json", "generation_config.json", "model.safetensors.index.json")]
    return [p for p in extra if p.exists()] + list(weights.files)


def source_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                h.update(block)
    return h.hexdigest()


def source_stat(files: list[Path]) -> dict[str, SourceFile]:
    return {p.name: SourceFile(size=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns) for p in files}


class WeightSource:
    """Checkpoint tensors -> external TensorProtos in the store, converted row-chunk by row-chunk.

    Called as source(name, dtype) for plain weights; source.quantized(name, bits) for MatMulNBits weights."""

    def __init__(self, weights: CheckpointWeights, store: WeightStore):
        self.weights, self.store = weights, store

    def _row_chunks(self, name: str):
        raw = self.weights.raw(name)
        is_bf16 = self.weights.dtype(name) == "BF16"
        rows = max(1, CHUNK_BYTES // max(1, raw[0].nbytes * 2)) if raw.ndim > 1 else len(raw)
        for start in range(0, len(raw), rows):
            part = raw[start:start + rows]
            yield bf16_bits_to_f32(part) if is_bf16 else np.asarray(part)

    def __call__(self, name: str, dtype: np.dtype):
        return self.store.add(name, self.weights.shape(name), dtype,
                              lambda: (c.astype(dtype, copy=False) for c in self._row_chunks(name)))

    def quantized(self, name: str, bits: int):
        """-> (packed uint8 (N, K/block, block*bits/8), scales float32 (N*K/block), block)."""
        n_rows, in_features = self.weights.shape(name)
        block = block_size_for(in_features, name)
        key = f"{name}.q{bits}"
        if key not in self.store.written:
            scales = []

            def packed_chunks():
                for chunk in self._row_chunks(name):
                    q, s = quantize_rows(chunk, bits, block)
                    scales.append(s)
                    yield q

            self.store.add(key, (n_rows, in_features // block, block * bits // 8), np.uint8, packed_chunks)
            self.store.add(f"{name}.scales{bits}", (n_rows * (in_features // block),), np.float32,
                           lambda: (s.reshape(-1) for s in scales))
        return self.store.written[key], self.store.written[f"{name}.scales{bits}"], block


def _tensor_specs(values) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append(TensorSpec(name=v.name, shape=[d.dim_value for d in t.shape.dim],
                              dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


def _graph_spec(model: onnx.ModelProto, rel_file: str) -> GraphSpec:
    mode_dir = rel_file.split("/")[0]
    files = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return GraphSpec(file=rel_file, weights_files=[f"{mode_dir}/{f}" for f in files],
                     inputs=_tensor_specs(model.graph.input), outputs=_tensor_specs(model.graph.output))


def _share_weights(src: Path, dst: Path, copy: bool):
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


def default_kv_dtype(precision: str) -> str:
    """The KV cache keeps what the attention computes in: float16 for fp16 graphs, else float32 (so fp32
    graphs cast nothing and match the reference exactly)."""
    return "float16" if precision == "fp16" else "float32"


def default_cache_windows(max_input_len: int, max_cache_len: int) -> list[int]:
    """C/8, C/4, C/2 (those that hold a prompt chunk) and C: a decode step attends over at most twice the
    slots it needs once past C/8, and the early steps of a long cache do not pay for all of it."""
    smaller = {max_cache_len >> s for s in (3, 2, 1)}
    return sorted(w for w in smaller if max_input_len <= w < max_cache_len) + [max_cache_len]


def resolve_cache_windows(windows: list[int] | None, max_input_len: int, max_cache_len: int) -> list[int]:
    """The manifest's cache_windows for --cache_windows (None: the default ones): sorted, C included."""
    if windows is None:
        windows = default_cache_windows(max_input_len, max_cache_len)
    bad = [w for w in windows if not 1 <= w <= max_cache_len]
    if bad:
        raise StagepipeError(f"--cache_windows {bad[0]}: each window must be 1..max_cache_len ({max_cache_len})")
    return sorted(set(windows) | {max_cache_len})


def convert(model_path, onnx_dir, blocks: int | None = None, layer_split: list[int] | None = None,
            max_input_len: int = 16, max_cache_len: int = 1024, precision: str = "fp32",
            kv_dtype: str = "auto", copy_weights: bool = False, log=print,
            cache_windows: list[int] | None = None) -> Manifest:
    """cache_windows: attention windows with their own block graphs (None: default_cache_windows; [] : none)."""
    model_path, onnx_dir = Path(model_path), Path(onnx_dir)
    if max_input_len < 1 or max_cache_len < max_input_len:
        raise StagepipeError(f"--max_input_len {max_input_len} and --max_cache_len {max_cache_len}: need "
                             "1 <= max_input_len <= max_cache_len")
    if precision not in PRECISIONS:
        raise StagepipeError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if kv_dtype == "auto":
        kv_dtype = default_kv_dtype(precision)
    if kv_dtype not in ("float16", "float32"):
        raise StagepipeError(f"--kv_dtype {kv_dtype}: choose auto, float16 or float32")
    windows = resolve_cache_windows(cache_windows, max_input_len, max_cache_len)
    config = load_model_config(model_path)
    ranges = split_layers(config.num_layers, blocks, layer_split)
    weights = CheckpointWeights(model_path)
    check_checkpoint(config, weights)
    if onnx_dir.exists() and any(onnx_dir.iterdir()) and not (onnx_dir / "manifest.json").exists():
        raise StagepipeError(f"--onnx_dir {onnx_dir} exists and is not a stagepipe onnx_dir; "
                             "choose an empty or new folder")

    started = time.perf_counter()
    onnx_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_dir.parent / f".{onnx_dir.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        manifest = _write_onnx_dir(config, ranges, weights, model_path, tmp, max_input_len, max_cache_len,
                                   precision, kv_dtype, copy_weights, log, windows)
        _replace_dir(tmp, onnx_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"converted {model_path} -> {onnx_dir} in {time.perf_counter() - started:.1f}s")
    return manifest


def _graph_sets(max_input_len: int, max_cache_len: int, windows: list[int]):
    """-> [(graph set, mode, shape)]: the full-cache sets (every stage) first, then one per smaller window
    (block graphs only)."""
    return [(graph_set(mode, w, max_cache_len), mode, GraphShape(T=T, C=w, cache_len=max_cache_len))
            for w in sorted(windows, reverse=True) for mode, T in (("prefill", max_input_len), ("decode", 1))]


def _write_onnx_dir(config, ranges, weights, model_path, out, max_input_len, max_cache_len, precision, kv_dtype,
                    copy_weights, log, windows) -> Manifest:
    for mode in ("prefill", "decode"):
        (out / mode).mkdir(parents=True)
    prec = Precision(compute=np.dtype(np.float16 if precision == "fp16" else np.float32), kv=np.dtype(kv_dtype),
                     weight_bits=PRECISIONS[precision])
    graph_sets = _graph_sets(max_input_len, max_cache_len, windows)
    store = WeightStore(out / "prefill")
    lookup = WeightSource(weights, store)
    builders = {"embed": lambda shape: build_embed(config, prec, shape, lookup)}
    for b, (start, end) in enumerate(ranges):
        builders[f"block{b}"] = lambda shape, r=range(start, end): build_block(config, prec, shape, r, lookup)
    builders["output"] = lambda shape: build_output(config, prec, shape, lookup)

    graphs: dict[str, dict[str, GraphSpec]] = {name: {} for name, *_ in graph_sets}
    graph_hash = hashlib.sha256()
    nonstandard: set[str] = set()
    sets_of = {stage: [gs for gs in graph_sets if stage.startswith("block") or gs[0] == gs[1]] for stage in builders}
    total, done = sum(map(len, sets_of.values())), 0
    for stage, build in builders.items():
        store.open(f"{stage}.data")
        for name, mode, shape in sets_of[stage]:
            t0 = time.perf_counter()
            model = build(shape)
            # a window's graphs sit beside the full-cache ones and read the same <stage>.data
            rel = f"{mode}/{stage}.onnx" if name == mode else f"{mode}/{stage}_c{shape.C}.onnx"
            data = model.SerializeToString()
            (out / rel).write_bytes(data)
            graph_hash.update(data)
            graphs[name][stage] = _graph_spec(model, rel)
            nonstandard |= {f"{n.domain}:{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")}
            done += 1
            log(f"[{done}/{total}] {rel} ({time.perf_counter() - t0:.1f}s)")
        store.close()
        _share_weights(out / "prefill" / f"{stage}.data", out / "decode" / f"{stage}.data", copy_weights)
    graph_hash.update(store.hasher.digest())

    copied = []
    for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
        if (model_path / name).exists():
            shutil.copyfile(model_path / name, out / name)
            copied.append(name)
    files = source_files(model_path, weights)
    manifest = Manifest(
        stagepipe_version=__version__, graph_format=GRAPH_FORMAT, model=config, precision=precision, kv_dtype=kv_dtype,
        max_input_len=max_input_len, max_cache_len=max_cache_len, cache_windows=windows, mask_value=MASK_VALUE,
        opset=OPSET,
        blocks=[BlockSpec(index=i, layer_start=s, layer_end=e) for i, (s, e) in enumerate(ranges)],
        graphs=graphs, source_path=str(model_path.resolve()), source_files=source_stat(files),
        source_fingerprint=source_fingerprint(files), graphs_fingerprint=graph_hash.hexdigest(),
        tokenizer_files=[n for n in copied if n in TOKENIZER_FILES],
        nonstandard_ops=sorted(nonstandard))
    write_text(out / "manifest.json", manifest.model_dump_json(indent=2) + "\n")
    return manifest


def _replace_dir(new: Path, target: Path):
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 7,7,7,7, got {text!r}") from None


def parse_cache_windows(text: str) -> list[int] | None:
    if text.strip() in ("auto", ""):
        return None
    return [] if text.strip() == "none" else _int_list(text)


def add_convert_args(p: argparse.ArgumentParser):
    p.add_argument("--model_path", required=True, help="HuggingFace checkpoint folder (config.json, *.safetensors)")
    p.add_argument("--onnx_dir", required=True, help="output folder for manifest.json and the graphs")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--blocks", type=int, default=None, help="number of decoder blocks (default 4)")
    split.add_argument("--layer_split", type=_int_list, default=None, help="layers per block, e.g. 7,7,7,7")
    p.add_argument("--max_input_len", type=int, default=16, help="tokens per prefill step (T)")
    p.add_argument("--max_cache_len", type=int, default=1024, help="KV cache slots (C)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="fp32/fp16: standard ops; int8/int4: weight-only MatMulNBits (com.microsoft), CPU")
    p.add_argument("--cache_windows", type=parse_cache_windows, default=None,
                   help="attention windows below C with their own block graphs: auto (C/8, C/4, C/2), none, or "
                        "a list like 128,256,512 (a step uses the smallest that holds past_len + its tokens)")
    p.add_argument("--kv_dtype", choices=["auto", "float16", "float32"], default="auto",
                   help="KV cache dtype (auto: float16 for fp16 graphs, else float32)")
    p.add_argument("--copy_weights", action="store_true",
                   help="decode/*.data as copies instead of hard links to prefill's (onnx >= 1.21 refuses to load "
                        "weights from hard-linked files; onnxruntime is fine with them)")


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pipeline.convert", description=__doc__.split("\n")[0])
    add_convert_args(p)
    a = p.parse_args(argv)
    convert(a.model_path, a.onnx_dir, a.blocks, a.layer_split, a.max_input_len, a.max_cache_len, a.precision,
            a.kv_dtype, a.copy_weights, cache_windows=a.cache_windows)


if __name__ == "__main__":
    main()
