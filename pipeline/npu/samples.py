"""Each stage's inputs at each step of a run set's runs, as the graphs of an onnx_dir take them.

The golden run already wrote what calibration needs: a step folder holds a stage's input tensors (input ids, hidden
states, the attention mask, positions), and the run's final kv_cache holds every slot a block attended to: a step
writes only its own slots [past_len, next_past_len), and its mask hides the slots from past_len on, so the cache
as the step saw it is the final cache's slots [0, past_len) and zeros above (a fresh cache's content).

A StageSample renders its feeds for any graph of the same model: another attention window (the mask re-laid out),
a graph that takes only its window's cache slots (convert --cache_input window) or RoPE tables (--rope_input).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import graph_set, hidden_file
from pipeline.core.tensors import load_tensor
from pipeline.runtime.plan import rope_tables, step_inputs, window_for
from schemas.manifest import GraphSpec, Manifest
from schemas.run import RunSettings, StepMeta


@dataclass
class RunFolderView:
    """A finished (or partly finished) run folder, read-only: its settings, steps and final cache."""

    dir: Path
    settings: RunSettings

    @classmethod
    def open(cls, path: Path) -> "RunFolderView":
        return cls(Path(path), load_model_file(Path(path) / layout.RUN_JSON, RunSettings))

    def steps(self) -> list[tuple[Path, StepMeta]]:
        out = []
        for d in layout.step_dirs(self.dir):
            if (d / layout.META).is_file():
                out.append((d, load_model_file(d / layout.META, StepMeta)))
        return out

    def cache(self, kind: str, k: int) -> np.ndarray:
        path = self.dir / layout.KV_DIR / layout.kv_file(kind, k)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise StagepipeError(f"{path}: the run's KV cache file cannot be read ({e}); calibration needs the "
                                 "run's kv_cache for block inputs") from None


def open_run_set(path: Path) -> list[RunFolderView]:
    """The run folders of a run set (python -m pipeline.run_set), or one run folder."""
    path = Path(path)
    if not path.is_dir():
        raise StagepipeError(f"{path}: not a folder; give a run set (python -m pipeline.run_set) or a run folder")
    runs = [RunFolderView.open(d) for d in layout.set_run_dirs(path) if (d / layout.RUN_JSON).is_file()]
    if not runs:
        raise StagepipeError(f"{path}: no run folders with {layout.RUN_JSON} in it; make one with "
                             "python -m pipeline.run_set or doit run_auto")
    return runs


def check_same_model(runs: list[RunFolderView], m: Manifest, where: Path):
    """The runs' tensors must fit the graphs: same T, C and hidden size (the weights' precision may differ)."""
    for run in runs:
        steps = run.steps()
        if not steps:
            continue
        meta = steps[0][1]
        if (meta.max_input_len, meta.max_cache_len) != (m.max_input_len, m.max_cache_len):
            raise StagepipeError(f"{run.dir}: made with max_input_len/max_cache_len {meta.max_input_len}/"
                                 f"{meta.max_cache_len}, the graphs of {where} take {m.max_input_len}/"
                                 f"{m.max_cache_len}; run the set with graphs converted like these")


@dataclass
class StageSample:
    """The inputs of one stage at one step of one run."""

    run: RunFolderView
    step_dir: Path
    meta: StepMeta
    stage: str
    rows: int  # T of the graph this sample feeds (output stage: 1 for a prefill step's last real row)

    @property
    def name(self) -> str:
        return f"{self.run.dir.name}/{self.step_dir.name}"

    @property
    def mode(self) -> str:
        return "prefill" if self.rows > 1 else "decode"

    def graph_set(self, m: Manifest) -> str:
        """The graph set of m this sample runs through: its mode, and for blocks the smallest window of m's."""
        if not self.stage.startswith("block"):
            return self.mode
        return graph_set(self.mode, window_for(m, self.meta.next_past_len), m.max_cache_len)

    def feeds(self, spec: GraphSpec, m: Manifest) -> dict[str, np.ndarray]:
        """{input name: tensor} for the graph spec (one of m's graphs for this stage)."""
        return {t.name: self._input(t.name, t.shape, np.dtype(t.dtype), m) for t in spec.inputs}

    def _tensor(self, name: str) -> np.ndarray:
        return load_tensor(self.step_dir / name, what=name)

    def _input(self, name: str, shape: list[int], dtype: np.dtype, m: Manifest) -> np.ndarray:
        meta, T = self.meta, self.rows
        k = int(self.stage[5:]) if self.stage.startswith("block") else None
        if name == "input_ids":
            value = self._tensor(layout.INPUT_IDS)
        elif name == "hidden_states":
            value = self._tensor(hidden_file(len(m.blocks) if k is None else k))
            if T < value.shape[1]:  # the output stage on a prefill step's last real row, as run_auto runs it
                value = value[:, meta.q_len - 1:meta.q_len]
        elif name == "attention_mask":
            value = self._tensor(layout.ATTENTION_MASK)
            if value.shape != tuple(shape):  # another window than the run's: the same mask laid out for it
                value = step_inputs(meta.input_token_ids, meta.past_len, T, shape[3] - T, m.mask_value)[1]
        elif name == "position_ids":
            value = self._tensor(layout.POSITION_IDS)
        elif name in ("cos", "sin"):
            file = self.step_dir / (layout.ROPE_COS if name == "cos" else layout.ROPE_SIN)
            if file.is_file():
                value = load_tensor(file, what=name)
            else:  # a run of graphs without RoPE inputs: the tables of its positions
                cos, sin = rope_tables(m, self._tensor(layout.POSITION_IDS))
                value = sin if name == "sin" else cos
        elif name in ("past_key", "past_value"):
            value = np.zeros(shape, dtype)
            past = meta.past_len
            value[:, :, :, :past] = self.run.cache(name[5:], k)[:, :, :, :past]
        else:
            raise StagepipeError(f"graph input {name!r} of {self.stage}: calibration does not know where it comes from")
        if tuple(value.shape) != tuple(shape):
            raise StagepipeError(f"{self.step_dir}: {name} has shape {list(value.shape)}, the {self.stage} graph "
                                 f"takes {shape}; are the runs from this model with these T and C?")
        return np.ascontiguousarray(value, dtype=dtype)


def stage_samples(runs: list[RunFolderView], stage: str, blocks: int) -> list[StageSample]:
    """Every step of the runs where the stage ran (its output is in the step folder), in run and step order. The
    output stage of a prefill step contributes its last real row (what run_auto's head takes) and all T rows."""
    if stage != "embed" and stage != "output" and not (stage.startswith("block") and stage[5:].isdigit()
                                                         and int(stage[5:]) < blocks):
        names = ", ".join(["embed"] + [f"block{k}" for k in range(blocks)] + ["output"])
        raise StagepipeError(f"--stage {stage}: the stages are {names}")
    written = {"embed": hidden_file(0), "output": layout.LOGITS}.get(stage) or hidden_file(int(stage[5:]) + 1)
    samples = []
    for run in runs:
        for d, meta in run.steps():
            if not (d / written).is_file():
                continue
            T = meta.max_input_len if meta.mode == "prefill" else 1
            samples.append(StageSample(run, d, meta, stage, T))
            if stage == "output" and T > 1:
                samples.append(StageSample(run, d, meta, stage, 1))
    return samples


def pick(samples: list[StageSample], limit: int, seed: int) -> list[StageSample]:
    """At most `limit` samples drawn at random (seeded), kept in run and step order."""
    if limit <= 0 or len(samples) <= limit:
        return list(samples)
    chosen = set(random.Random(seed).sample(range(len(samples)), limit))
    return [s for i, s in enumerate(samples) if i in chosen]


def spec_bytes(spec: GraphSpec) -> int:
    return sum(int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize for t in spec.inputs)
