"""Parse a Qwen2/Qwen3 config.json (transformers 4.x or 5.x style) into the few numbers the graphs need.

A Qwen2.5-VL config's language model is a Qwen2 text model with M-RoPE (pipeline/checkpoint/vl_config.py)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.checkpoint.vl_config import VL_ARCHITECTURES, read_config, vl_text_config
from pipeline.core.errors import StagepipeError
from schemas.manifest import ModelConfig
from pipeline.core.layout import GENERATION_CONFIG, MODEL_CONFIG

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM") + VL_ARCHITECTURES


def _rope_theta(cfg: dict, where: str) -> float:
    """rope_theta from 4.x (top level + rope_scaling) or 5.x (rope_parameters); refuse scaling we don't implement."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for block in (params, scaling):
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in ("default", None):
            raise StagepipeError(f"{where}: rope scaling type '{rope_type}' is not supported (only plain RoPE); "
                                 "remove rope_scaling from config.json or use a model without it")
    theta = params.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise StagepipeError(f"{where}: no rope_theta (top level or in rope_parameters); add it to config.json")
    return float(theta)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def load_model_config(model_dir: Path) -> ModelConfig:
    model_dir = Path(model_dir)
    where = model_dir / MODEL_CONFIG
    cfg = read_config(model_dir)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise StagepipeError(f"{where}: architecture {arch!r} is not supported; "
                             f"stagepipe converts {', '.join(SUPPORTED_ARCHITECTURES)}")
    mrope_section = []
    if arch in VL_ARCHITECTURES:
        cfg, mrope_section = vl_text_config(cfg, str(where))
    if cfg.get("use_sliding_window"):
        raise StagepipeError(f"{where}: use_sliding_window is true; sliding-window attention is not supported "
                             "(set it to false if the model was trained with full attention)")
    if any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise StagepipeError(f"{where}: layer_types has non-full attention layers; only full attention is supported")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        is_qwen3 = arch == "Qwen3ForCausalLM"
        attention_bias = bool(cfg.get("attention_bias", False))
        gen = {}
        gen_path = model_dir / GENERATION_CONFIG
        if gen_path.exists():
            gen = json.loads(gen_path.read_text())
        eos = _as_list(gen.get("eos_token_id")) or _as_list(cfg.get("eos_token_id"))
        config = ModelConfig(
            architecture=arch,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg, str(where)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(not is_qwen3) or attention_bias,
            o_bias=is_qwen3 and attention_bias,
            qk_norm=is_qwen3,
            weights_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
            bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
            eos_token_ids=eos,
            mrope_section=mrope_section,
        )
    except KeyError as e:
        raise StagepipeError(f"{where}: required field {e} is missing") from None
    except (TypeError, ValueError) as e:
        raise StagepipeError(f"{where}: a field has an invalid value ({e})") from None
    if heads % kv_heads:
        raise StagepipeError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return config
