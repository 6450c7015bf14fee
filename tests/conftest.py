"""Session-scoped random-weight HF checkpoints (see tests/hf_oracle.py), each written lazily, once per session.

Use a named fixture (qwen3_tied, ...), `all_checkpoints`, or parametrize over names indirectly:

    @pytest.mark.parametrize("checkpoint", list(CHECKPOINT_SPECS), indirect=True)
    def test_x(checkpoint): ...            # checkpoint is the Path of that spec's folder
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.hf_oracle import CHECKPOINT_SPECS, load_hf_model, make_checkpoint


class _LazyCheckpoints:
    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}
        self._models: dict[str, object] = {}

    def path(self, name: str) -> Path:
        if name not in CHECKPOINT_SPECS:
            raise KeyError(f"unknown checkpoint spec {name!r}; known: {', '.join(CHECKPOINT_SPECS)}")
        if name not in self._paths:
            self._paths[name] = make_checkpoint(self.root / name, CHECKPOINT_SPECS[name])
        return self._paths[name]

    def model(self, name: str):
        """The transformers model (float32, eager, eval) for a spec, loaded once per session. Don't mutate it."""
        if name not in self._models:
            self._models[name] = load_hf_model(self.path(name))
        return self._models[name]


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory) -> _LazyCheckpoints:
    """Lazy cache: .path(name) -> checkpoint folder, .model(name) -> loaded HF model."""
    return _LazyCheckpoints(tmp_path_factory.mktemp("hf_checkpoints"))


@pytest.fixture(scope="session")
def checkpoint_path(hf_checkpoints):
    """Callable name -> checkpoint folder (written on first use)."""
    return hf_checkpoints.path


@pytest.fixture(scope="session")
def hf_model(hf_checkpoints):
    """Callable name -> loaded float32 HF model (loaded on first use, shared for the session)."""
    return hf_checkpoints.model


@pytest.fixture(scope="session")
def qwen3_tied(hf_checkpoints) -> Path:
    return hf_checkpoints.path("qwen3_tied")


@pytest.fixture(scope="session")
def qwen2_bias(hf_checkpoints) -> Path:
    return hf_checkpoints.path("qwen2_bias")


@pytest.fixture(scope="session")
def qwen3_uneven(hf_checkpoints) -> Path:
    return hf_checkpoints.path("qwen3_uneven")


@pytest.fixture(scope="session")
def qwen3_bf16_shards_v4(hf_checkpoints) -> Path:
    return hf_checkpoints.path("qwen3_bf16_shards_v4")


@pytest.fixture
def checkpoint(request, hf_checkpoints) -> Path:
    """Checkpoint folder for the spec name given by indirect parametrization."""
    name = getattr(request, "param", None)
    if name is None:
        raise pytest.UsageError('the `checkpoint` fixture needs a spec name: '
                                '@pytest.mark.parametrize("checkpoint", [...], indirect=True)')
    return hf_checkpoints.path(name)


@pytest.fixture(scope="session")
def small_onnx(tmp_path_factory):
    """(checkpoint, onnx_dir) of the demo model in 2 blocks, T=8, C=64, float32 cache: the one small model the
    run, tool and fault tests share (converted once per session)."""
    from tests.run_helpers import make_small_onnx

    return make_small_onnx(tmp_path_factory.mktemp("small"), max_input_len=8, max_cache_len=64)
