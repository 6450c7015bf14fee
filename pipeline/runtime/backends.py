"""Backends map stage inputs to stage outputs. A step picks the prefill or decode graphs by its T, and a block's
graphs by its attention window W (the cache slots [0, W) it attends to), which the attention mask's width tells:
(1,1,T,W+T).

To plug in another runtime (an NPU's), subclass Backend and implement the three methods; everything else
(files, cache, sampling, run_auto) stays the same.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_manifest
from pipeline.core.layout import VISION, graph_set, graph_set_mode
from pipeline.runtime.graph_files import GraphFiles
from pipeline.runtime.plan import hidden_dtype, plan_step, rope_tables
from schemas.manifest import GraphSpec, Manifest
from pipeline.core.layout import MODEL_CONFIG


FLOAT_PRECISIONS = ("fp32", "fp16")  # graphs whose weights are plain float tensors


class Backend:
    name = "base"

    def __init__(self, onnx_dir: Path, manifest: Manifest | None = None):
        self.onnx_dir = Path(onnx_dir)
        self.manifest = manifest or load_manifest(self.onnx_dir)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def block(self, k: int, hidden, attention_mask, position_ids, past_key, past_value, rope=None):
        """past_key/past_value: the block's (Lk,1,KV,C,D) cache; the step attends to its slots [0, W), W =
        attention_mask.shape[3] - T, one of manifest.windows() (see block_window). rope: the step's (cos, sin)
        tables (T, D), given for graphs that take them (manifest.rope_input); None: from position_ids.
        -> (hidden_states_out (1,T,H), present_key, present_value (Lk,1,KV,T,D))"""
        raise NotImplementedError

    def output(self, hidden: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def vision(self, stage: str, x: np.ndarray) -> np.ndarray:
        """VL models: one vision stage (pipeline/convert/vision_graphs.py): "vision_patch" (N,P) pixel patches
        -> (N,C); "vision_block{K}" (N,C) -> (N,C); "vision_merger" (N,C) -> image embeds (M,E)."""
        raise NotImplementedError

    def close(self, graphs: str, stage: str):
        """Free what running a graph holds (sessions, mapped weights); the next use opens it again."""

    def graph_spec(self, graphs: str, stage: str) -> GraphSpec:
        """A graph of the manifest: graphs is a graph set ("prefill", "decode_c128", ...) or "vision"."""
        m = self.manifest
        if graphs == VISION:
            if m.vision is None or stage not in m.vision.graphs:
                raise StagepipeError(f"{self.onnx_dir}: no vision graph {stage!r}; convert a Qwen2.5-VL checkpoint")
            return m.vision.graphs[stage]
        return m.graphs[graphs][stage]

    def mode_for(self, T: int) -> str:
        m = self.manifest
        if T == m.max_input_len:
            return "prefill"
        if T == 1:
            return "decode"
        raise StagepipeError(f"a step has T={T} tokens; the graphs take {m.max_input_len} (prefill) or 1 (decode)")

    def block_graph_set(self, T: int, window: int) -> str:
        m = self.manifest
        if window not in m.windows():
            raise StagepipeError(f"a block step attends to {window} cache slots; the graphs have windows of "
                                 f"{', '.join(map(str, m.windows()))} slots")
        return graph_set(self.mode_for(T), window, m.max_cache_len)

    def block_window(self, hidden, attention_mask) -> int:
        """The attention window W of a block step, from its mask (1,1,T,W+T)."""
        return attention_mask.shape[3] - hidden.shape[1]


class OnnxBackend(Backend):
    """onnxruntime; one session per graph, created on first use (or all at once by open_all).

    Weights are memory-mapped from the .data files once and handed to every session as shared initializers,
    with onnxruntime's weight prepacking off: the prefill and decode sessions of a stage read the same pages
    instead of each holding its own copy (and a session starts in tens of milliseconds). int8/int4 graphs
    (MatMulNBits) are the exception: they are fast only prepacked, so each session packs its own copy."""

    name = "onnx"

    def __init__(self, onnx_dir: Path, manifest: Manifest | None = None, provider: str = "cpu", threads: int = 0,
                 process_pool: bool = False):
        super().__init__(onnx_dir, manifest)
        self.providers = onnx_providers(provider)
        self.threads = threads
        self.process_pool = process_pool  # see use_process_thread_pool
        self._sessions = {}
        self._weights = SharedWeights()
        self._files = GraphFiles(self.onnx_dir, self.manifest)

    def open_all(self, steps=None, stages=None):
        """Create now the sessions that running `steps` ((past_len, q_len) pairs, in order) uses, so that step
        timings measure compute only; every graph's when steps is None (each block then keeps its last window's
        where sessions hold their own weights, see below). stages: only these (a hybrid run routes
        the others elsewhere). The T>1 output graph is left to first use: a prefill step's logits come from the
        T=1 graph unless full logits are asked for.

        Where sessions hold their own weights (int8/int4 packed, or on a GPU) only the first window each mode
        uses is opened: a block keeps one window's session per mode (see session), so a long prompt's later
        windows open when its steps reach them."""
        m = self.manifest
        if steps is None:
            wanted = [(graphs, stage) for graphs, graph_stages in m.graphs.items() for stage in graph_stages]
        else:
            plans = [plan_step(m, past_len, q_len) for past_len, q_len in steps]
            first_window = {}
            wanted = [("decode", "output")] + [(p.mode, "embed") for p in plans]
            for p in plans:
                if self._shares_weights or first_window.setdefault(p.mode, p.W) == p.W:
                    wanted += [(p.block_graphs, f"block{k}") for k in range(len(m.blocks))]
        for graphs, stage in dict.fromkeys(wanted):
            if stages is None or stage in stages:
                self.session(graphs, stage)
        self._weights.prefault()

    def session(self, mode: str, stage: str):
        key = (mode, stage)
        if key not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            share = self._shares_weights
            if share:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            # worker threads spin between the ops of a run (a decode block is hundreds of small ops) and stop when
            # it ends, so one session's idle workers never spin on the cores the next stage's session needs
            # (int4 decode step 21.6 -> 18.9 ms on 2 cores; spinning on between runs: decode 3.6 vs ~9 tok/s)
            opts.add_session_config_entry("session.force_spinning_stop", "1")
            cpu = self.providers[0] == "CPUExecutionProvider"
            on_process_pool = self.process_pool and cpu and use_process_thread_pool(opts, self.threads)
            if self.threads and not on_process_pool:
                opts.intra_op_num_threads = self.threads
            if not share and stage.startswith("block"):
                self._close_other_windows(mode, stage)
            spec = self.graph_spec(mode, stage)
            for rel in (spec.file, *spec.weights_files):  # the files the converter wrote, unchanged
                self._files.check(rel)
            path = self.onnx_dir / spec.file
            try:
                if share:
                    for name, value in self._weights.initializers(path):
                        opts.add_initializer(name, value)
                self._sessions[key] = ort.InferenceSession(str(path), opts, providers=self.providers)
            except Exception as e:  # onnxruntime raises its own types; name the graph and stop
                raise StagepipeError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                                     "reconvert the model") from None
        return self._sessions[key]

    @property
    def _shares_weights(self) -> bool:
        """Sessions read one shared memory map of the weights (float graphs on CPU: plain MatMul/Gemm read the
        pages as they are). Else each session holds its own copy: MatMulNBits (int8/int4) is fast only with its
        weights prepacked, and onnxruntime packs only weights it loads itself (not shared initializers); QDQ
        graphs' int4 weights cannot be mapped as numpy arrays at all; a GPU session copies them to the device."""
        return self.providers[0] == "CPUExecutionProvider" and self.manifest.precision in FLOAT_PRECISIONS

    def _close_other_windows(self, graphs: str, stage: str):
        """Before a block opens at another window, close its session of the mode's previous window (steps move
        to larger windows as the cache fills): a 480-token int4 prompt would otherwise hold the packed weights
        of three prefill windows at once."""
        mode = graph_set_mode(graphs)
        others = [g for g, s in self._sessions if s == stage and g != graphs and graph_set_mode(g) == mode]
        for other in others:
            self.close(other, stage)
        if others:
            return_freed_memory()

    def _run(self, stage: str, T: int, feeds: dict):
        return self.session(self.mode_for(T), stage).run(None, feeds)

    def embed(self, input_ids):
        return self._run("embed", input_ids.shape[1], {"input_ids": input_ids})[0]

    def block(self, k, hidden, attention_mask, position_ids, past_key, past_value, rope=None):
        m = self.manifest
        graphs = self.block_graph_set(hidden.shape[1], self.block_window(hidden, attention_mask))
        slots = next(i.shape[3] for i in m.graphs[graphs][f"block{k}"].inputs if i.name == "past_key")
        if slots < past_key.shape[3]:  # window graphs that take only their slots (--cache_input window, or old)
            past_key, past_value = past_key[:, :, :, :slots], past_value[:, :, :, :slots]
        # the whole cache goes in as it is (onnxruntime reads the buffer, no copy); a window view is copied
        feeds = {"hidden_states": hidden, "attention_mask": attention_mask,
                 "past_key": np.ascontiguousarray(past_key), "past_value": np.ascontiguousarray(past_value)}
        if m.rope_input:
            feeds["cos"], feeds["sin"] = rope if rope is not None else rope_tables(m, position_ids)
        else:
            feeds["position_ids"] = position_ids
        return tuple(self.session(graphs, f"block{k}").run(None, feeds))

    def output(self, hidden):
        return self._run("output", hidden.shape[1], {"hidden_states": hidden})[0]

    def vision(self, stage, x):
        return self.session(VISION, stage).run(None, {self.graph_spec(VISION, stage).inputs[0].name: x})[0]

    def close(self, graphs: str, stage: str):
        """Drop a graph's session and unmap the weights no other session reads (the image step closes each vision
        stage after its one run: the 3B tower's 2.7 GB are never all mapped at once, nor kept for generation)."""
        if self._sessions.pop((graphs, stage), None) is not None:
            self._weights.release(self.onnx_dir / self.graph_spec(graphs, stage).file)


class ReferenceBackend(Backend):
    """The numpy reference, reading the checkpoint the onnx_dir was converted from."""

    name = "reference"

    def __init__(self, onnx_dir: Path, manifest: Manifest | None = None, model_path: Path | None = None):
        super().__init__(onnx_dir, manifest)
        from pipeline.runtime.reference import ReferenceModel

        path = Path(model_path or self.manifest.source_path)
        if not (path / MODEL_CONFIG).exists():
            raise StagepipeError(f"reference backend: checkpoint {path} (from manifest.json source_path) is gone; "
                                 "pass --model_path")
        self.model = ReferenceModel(path)
        self.compute_dtype = hidden_dtype(self.manifest)

    def embed(self, input_ids):
        self.mode_for(input_ids.shape[1])
        return self.model.embed(input_ids).astype(self.compute_dtype)

    def block(self, k, hidden, attention_mask, position_ids, past_key, past_value, rope=None):
        window = self.block_window(hidden, attention_mask)  # rope: computed here from position_ids
        self.block_graph_set(hidden.shape[1], window)
        b = self.manifest.blocks[k]
        return self.model.block(range(b.layer_start, b.layer_end), hidden, attention_mask, position_ids,
                                past_key[:, :, :, :window], past_value[:, :, :, :window])

    def output(self, hidden):
        return self.model.output(hidden)

    def vision(self, stage, x):
        from pipeline.runtime.vision import VisionReference

        self.graph_spec(VISION, stage)  # one of these graphs' vision stages
        spec = self.manifest.vision
        if getattr(self, "_vision", None) is None:
            self._vision = VisionReference(self.model.model_dir, spec.image_size, self.model.weights)
        return self._vision.run_stage(stage, x, spec.blocks)


class SharedWeights:
    """External-data initializers as read-only memory maps, one per (file, offset) however many graphs use it.
    Prefill and decode weight files are hard links of one file: keyed by inode, they map once."""

    def __init__(self):
        self._arrays: dict[tuple, np.ndarray] = {}
        self._values: dict[Path, list] = {}  # per graph: OrtValues must outlive the sessions that use them
        self._keys: dict[Path, set] = {}  # per graph: the arrays its session reads

    def prefault(self):
        """Map every weight page into this process now. Touching one byte per page takes ~0.15 s for 2.3 GB;
        left to the first step, the same page faults (taken by onnxruntime's threads) cost it ~0.5 s."""
        page = mmap.PAGESIZE
        for arr in self._arrays.values():
            flat = arr.reshape(-1).view(np.uint8)
            int(flat[::page].sum())

    def initializers(self, graph_path: Path):
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(graph_path), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            data_file = graph_path.parent / info["location"]
            st = data_file.stat()
            key = (st.st_dev, st.st_ino, int(info.get("offset", 0)))
            if key not in self._arrays:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
                self._arrays[key] = np.memmap(data_file, dtype=dtype, mode="r", offset=key[2], shape=tuple(t.dims))
            value = ort.OrtValue.ortvalue_from_numpy(self._arrays[key])
            self._values.setdefault(graph_path, []).append(value)
            self._keys.setdefault(graph_path, set()).add(key)
            yield t.name, value

    def release(self, graph_path: Path):
        """Unmap the weights only this graph's (closed) session read."""
        self._values.pop(graph_path, None)
        mine = self._keys.pop(graph_path, set())
        for key in mine - set().union(*self._keys.values()):
            self._arrays.pop(key, None)


def return_freed_memory():
    """Hand the heap pages a closed session freed back to the system (glibc's malloc_trim; elsewhere nothing):
    glibc may keep them, and the next window's sessions would come on top in the process's memory."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


_pool_threads: int | None = None  # the size the process-wide onnxruntime thread pool was made with


def use_process_thread_pool(opts, threads: int) -> bool:
    """Put a session on the process's one onnxruntime thread pool (made on first use with `threads` threads,
    0: one per core) and return True; False when that pool has another size (one size per process).

    For processes whose every session is a stage's (run_auto, the benchmark's loop): once the pool exists,
    onnxruntime refuses sessions with their own threads in the process. Stages run one after another, so one
    pool serves them all; in run_auto an int4 decode block took 4.5 ms on it against ~6 ms with a pool per
    session (same spinning settings)."""
    global _pool_threads
    import onnxruntime as ort

    if _pool_threads is None:
        ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
        _pool_threads = threads
    if _pool_threads != threads:
        return False
    opts.use_per_session_threads = False
    return True


def onnx_providers(provider: str) -> list[str]:
    """onnxruntime execution providers for --provider cpu|cuda (CUDA falls back to CPU for unsupported ops)."""
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise StagepipeError("--provider cuda: this onnxruntime has no CUDAExecutionProvider; install "
                                 "onnxruntime-gpu instead of onnxruntime (pip install -e '.[gpu]') on a CUDA machine")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise StagepipeError(f"--provider {provider}: choose cpu or cuda")


BACKENDS = {"onnx": OnnxBackend, "reference": ReferenceBackend}


def backend_class(name: str) -> type[Backend]:
    """A registered backend (BACKENDS), or one named by its import path, "package.module:ClassName", so a runtime
    of your own plugs in without editing this file."""
    if name in BACKENDS:
        return BACKENDS[name]
    if ":" not in name:
        raise StagepipeError(f"--backend {name}: choose one of {', '.join(BACKENDS)}, or name a Backend subclass "
                             "as package.module:ClassName")
    import importlib

    module, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise StagepipeError(f"--backend {name}: cannot import it ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise StagepipeError(f"--backend {name}: is not a subclass of pipeline.runtime.backends.Backend")
    return cls


def stage_process_kwargs(name: str, provider: str = "cpu", threads: int = 0) -> dict:
    """make_backend arguments for a process that runs stages only (run_auto, the workbench tools): onnxruntime
    backends (OnnxBackend and its subclasses) share the process's thread pool (of `threads` threads, 0: one per
    core); once it exists, onnxruntime refuses sessions with their own threads in the process."""
    if not issubclass(backend_class(name), OnnxBackend):
        return {}
    return {"provider": provider, "process_pool": True, "threads": threads}


def make_backend(name: str, onnx_dir: Path, manifest: Manifest | None = None, **kwargs) -> Backend:
    return backend_class(name)(onnx_dir, manifest, **kwargs)
