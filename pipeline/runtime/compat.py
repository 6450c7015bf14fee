"""Whether the graphs of two onnx_dirs can stand in for each other stage by stage: the same model dimensions,
block split, T and C (and, where a step's mask must fit both, the same attention windows). Precision and
kv_dtype may differ: callers cast hidden states and cache at the stage boundary."""
from __future__ import annotations

from schemas.manifest import Manifest

MODEL_DIMENSIONS = ("architecture", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size")


def manifest_differences(ref: Manifest, other: Manifest, windows: bool = True) -> list[str]:
    """What keeps `other`'s stages from replacing `ref`'s, one phrase each ([] when they can)."""
    diffs = [f"model {f} {getattr(other.model, f)} (not {getattr(ref.model, f)})" for f in MODEL_DIMENSIONS
             if getattr(ref.model, f) != getattr(other.model, f)]
    split = [(b.layer_start, b.layer_end) for b in ref.blocks]
    other_split = [(b.layer_start, b.layer_end) for b in other.blocks]
    if split != other_split:
        diffs.append(f"blocks of layers {_ranges(other_split)} (not {_ranges(split)})")
    for name in ("max_input_len", "max_cache_len"):
        if getattr(ref, name) != getattr(other, name):
            diffs.append(f"{name} {getattr(other, name)} (not {getattr(ref, name)})")
    if windows and ref.windows() != other.windows():
        diffs.append(f"cache_windows {other.windows()} (not {ref.windows()})")
    return diffs


def _ranges(split) -> str:
    return ",".join(f"{a}-{b - 1}" for a, b in split)


def why_not_interchangeable(ref: Manifest, other: Manifest, windows: bool = True) -> str | None:
    """None when `other` can stand in for `ref`; else a sentence naming the first difference and the fix."""
    diffs = manifest_differences(ref, other, windows)
    if not diffs:
        return None
    flags = "--blocks/--layer_split, --max_input_len, --max_cache_len" + (" and --cache_windows" if windows else "")
    more = f" (and {len(diffs) - 1} more difference{'s' if len(diffs) > 2 else ''})" if len(diffs) > 1 else ""
    return f"has {diffs[0]}{more}; convert it from the same model with the same {flags}"
