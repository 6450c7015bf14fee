"""Hybrid runs: some stages from another onnx_dir or backend, everything else from the main ones.

    doit run_auto --onnx_dir onnx/fp32 --stage_onnx block2=onnx/int4 --stage_backend output=npu

This is how a port is brought up one stage at a time. HybridBackend routes each stage call to its backend;
files, cache, sampling and resume stay as they are. Another onnx_dir must hold the same model with the same
block split, T, C and attention windows (checked); its precision may differ: the routed stage gets its inputs
cast to its dtypes (hidden states, KV cache) and its outputs cast back to the main graphs' dtypes.

A hybrid run has its own graphs fingerprint (over the main graphs and each routed stage's backend and graphs)
and backend name, so meta.json, the KV cache and doit tell its steps from a plain run's.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_manifest
from pipeline.runtime.backends import Backend, OnnxBackend, backend_class
from pipeline.runtime.compat import why_not_interchangeable
from pipeline.runtime.plan import hidden_dtype
from schemas.manifest import Manifest
from schemas.run import StageRoute


@dataclass(frozen=True)
class Route:
    stage: str
    backend: str
    onnx_dir: Path
    manifest: Manifest


def parse_stage_map(text: str, flag: str, stages: list[str]) -> dict[str, str]:
    """"block2=DIR,output:DIR2" -> {"block2": "DIR", "output": "DIR2"}; one clear error for anything else.

    STAGE:VALUE is there for doit, which takes a command-line word NAME=VALUE for a variable of its own
    (`doit run_auto --stage_onnx block2:DIR`, or `--stage_onnx=block2=DIR`)."""
    found: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        cut = min((i for i in (item.find("="), item.find(":")) if i >= 0), default=-1)
        stage, value = (item[:cut].strip(), item[cut + 1:].strip()) if cut >= 0 else (item, "")
        if not value:
            raise StagepipeError(f"{flag} {item!r}: expected STAGE=VALUE or STAGE:VALUE, e.g. block2:onnx/other")
        if stage not in stages:
            raise StagepipeError(f"{flag} {stage}: this model's stages are {', '.join(stages)}")
        if stage in found:
            raise StagepipeError(f"{flag}: {stage} is given twice")
        found[stage] = value
    return found


def plan_routes(main_dir: Path, main: Manifest, main_backend: str, stage_onnx: str = "",
                stage_backend: str = "") -> list[Route]:
    """The stages that run elsewhere, checked: a --stage_onnx stage runs the main backend on that onnx_dir
    unless --stage_backend names another; a --stage_backend stage uses the main onnx_dir unless --stage_onnx
    names another. [] for a plain run."""
    stages = main.stage_names()
    dirs = parse_stage_map(stage_onnx, "--stage_onnx", stages)
    backends = parse_stage_map(stage_backend, "--stage_backend", stages)
    routes, manifests = [], {}
    for stage in sorted(set(dirs) | set(backends), key=stages.index):
        onnx_dir = Path(dirs.get(stage, main_dir))
        key = str(onnx_dir.resolve())
        if key not in manifests:
            try:
                manifests[key] = load_manifest(onnx_dir)
            except StagepipeError as e:
                raise StagepipeError(f"--stage_onnx {stage}={onnx_dir}: {e}") from None
            why = why_not_interchangeable(main, manifests[key])
            if why:
                raise StagepipeError(f"--stage_onnx {stage}={onnx_dir}: {why}")
        name = backends.get(stage, main_backend)
        try:
            backend_class(name)  # an unknown backend is an error now, not at the first step
        except StagepipeError as e:
            raise StagepipeError(f"--stage_backend {stage}={name}: {str(e).split(': ', 1)[1]}") from None
        routes.append(Route(stage, name, onnx_dir, manifests[key]))
    return routes


def hybrid_manifest(main: Manifest, main_backend: str, routes: list[Route]) -> Manifest:
    """The main manifest with a fingerprint over the main graphs and every route (backend and graphs)."""
    identity = {"main": [main_backend, main.graphs_fingerprint],
                "routes": {r.stage: [r.backend, r.manifest.graphs_fingerprint] for r in routes}}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return main.model_copy(update={"graphs_fingerprint": fingerprint})


def hybrid_label(main_backend: str, routes: list[Route]) -> str:
    """The backend name a hybrid run records: onnx+block2=onnx@1a2b3c4d (@ the routed graphs' fingerprint)."""
    if not routes:
        return main_backend
    return main_backend + "+" + ",".join(f"{r.stage}={r.backend}@{r.manifest.graphs_fingerprint[:8]}" for r in routes)


def route_records(routes: list[Route]) -> dict[str, StageRoute]:
    """run.json's stage_routes."""
    return {r.stage: StageRoute(backend=r.backend, onnx_dir=str(r.onnx_dir.resolve()),
                                onnx_fingerprint=r.manifest.graphs_fingerprint) for r in routes}


def open_backend(make, name: str, onnx_dir: Path, manifest: Manifest, routes: list[Route]) -> Backend:
    """make(name, onnx_dir, manifest) -> Backend for the main backend and each route; a HybridBackend when
    there are routes. manifest: the run's (hybrid_manifest(...) when there are routes)."""
    main = make(name, onnx_dir, manifest)
    if not routes:
        return main
    return HybridBackend(main, {r.stage: make(r.backend, r.onnx_dir, r.manifest) for r in routes}, manifest,
                         hybrid_label(name, routes))


class HybridBackend(Backend):
    """Routes each stage to its own backend; stages of another precision are cast at their boundary."""

    def __init__(self, main: Backend, stage_backends: dict[str, Backend], manifest: Manifest, name: str):
        self.onnx_dir, self.manifest, self.name = main.onnx_dir, manifest, name
        self.main, self.stage_backends = main, stage_backends
        self._hidden, self._kv = hidden_dtype(manifest), np.dtype(manifest.kv_dtype)

    def backend_for(self, stage: str) -> Backend:
        return self.stage_backends.get(stage, self.main)

    def open_all(self, steps=None):
        routed = set(self.stage_backends)
        for backend, stages in [(self.main, [s for s in self.manifest.stage_names() if s not in routed])] + \
                [(b, [s]) for s, b in self.stage_backends.items()]:
            if isinstance(backend, OnnxBackend):  # only the stages it runs here
                backend.open_all(steps, stages=stages)
            elif hasattr(backend, "open_all"):
                backend.open_all(steps)

    def embed(self, input_ids):
        return self.backend_for("embed").embed(input_ids).astype(self._hidden, copy=False)

    def block(self, k, hidden, attention_mask, position_ids, past_key, past_value, rope=None):
        b = self.backend_for(f"block{k}")
        hd, kv = hidden_dtype(b.manifest), np.dtype(b.manifest.kv_dtype)
        tables = {"rope": rope} if rope is not None else {}  # backends of their own need not know the argument
        out, present_key, present_value = b.block(k, hidden.astype(hd, copy=False), attention_mask, position_ids,
                                                  past_key.astype(kv, copy=False), past_value.astype(kv, copy=False),
                                                  **tables)
        return (out.astype(self._hidden, copy=False), present_key.astype(self._kv, copy=False),
                present_value.astype(self._kv, copy=False))

    def output(self, hidden):
        b = self.backend_for("output")
        return b.output(hidden.astype(hidden_dtype(b.manifest), copy=False)).astype(np.float32, copy=False)

    def vision(self, stage, x):  # a VL model's vision stages run on the main backend
        return self.main.vision(stage, x)

    def close(self, graphs, stage):
        self.backend_for(stage).close(graphs, stage)
