"""ConvertOptions: every converter setting with its default, once. The CLI, `doit convert`, auto-conversion in
run_auto and the benchmarks all build from it."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.errors import StagepipeError
from pipeline.core.options import int_list, option

# precision -> weight bits: fp32/fp16 use standard ops only; int8/int4 are weight-only quantized linear layers
# (onnxruntime's com.microsoft MatMulNBits, for CPU targets), activations stay float32.
PRECISIONS = {"fp32": 0, "fp16": 0, "int8": 8, "int4": 4}
DEFAULT_BLOCKS = 4


def parse_cache_windows(text: str) -> list[int] | None:
    """--cache_windows: auto -> None (the defaults), none -> [], or 128,256,512."""
    if text.strip() in ("auto", ""):
        return None
    return [] if text.strip() == "none" else int_list(text)


@dataclass(frozen=True)
class ConvertOptions:
    model_path: Path | None = option(None, "HuggingFace checkpoint folder (config.json, *.safetensors)")
    onnx_dir: Path | None = option(None, "output folder for manifest.json and the graphs")
    blocks: int | None = option(None, "number of decoder blocks (default: 4, or fewer layers)")
    layer_split: list[int] | None = option(None, "layers per block, e.g. 7,7,7,7 (instead of --blocks)",
                                           parse=int_list)
    max_input_len: int = option(16, "tokens per prefill step (T)")
    max_cache_len: int = option(1024, "KV cache slots (C)")
    precision: str = option("fp32", "fp32/fp16: standard ops; int8/int4: weight-only MatMulNBits (com.microsoft), CPU",
                            choices=list(PRECISIONS))
    kv_dtype: str = option("auto", "KV cache dtype (auto: float16 for fp16 graphs, else float32)",
                           choices=["auto", "float16", "float32"])
    cache_windows: list[int] | None = option(
        None, "attention windows below C with their own block graphs: auto (C/8, C/4, C/2), none, or a list like "
              "128,256,512 (a step uses the smallest that holds past_len + its tokens)", parse=parse_cache_windows)
    cache_input: str = option("whole", "what the block graphs of a smaller attention window take: whole (the "
                                        "(Lk,1,KV,C,D) cache, their W slots sliced inside) or window (only their W "
                                        "slots, (Lk,1,KV,W,D): the runtime hands them the slice)",
                              choices=["whole", "window"])
    rope_input: bool = option(False, "block graphs take the RoPE tables cos/sin (T, D) as inputs, which token_embed "
                                     "computes (step files cos.npy, sin.npy): no Cos/Sin and no int64 in the blocks")
    image_size: int = option(448, "VL models: the image side in pixels the vision graphs take (a multiple of 28)")
    vision_blocks: int = option(4, "VL models: number of vision_block graphs the vision layers are split into")
    copy_weights: bool = option(False, "decode/*.data as copies instead of hard links to prefill's (onnx >= 1.21 "
                                       "refuses to load weights from hard-linked files; onnxruntime is fine)")

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """Layer ranges [(start, end), ...] per block: --layer_split, or --blocks as even as possible."""
        if self.layer_split:
            if any(n <= 0 for n in self.layer_split) or sum(self.layer_split) != num_layers:
                raise StagepipeError(f"--layer_split {','.join(map(str, self.layer_split))} must be positive numbers "
                                     f"summing to the model's {num_layers} layers")
            sizes = list(self.layer_split)
        else:
            blocks = self.blocks or min(DEFAULT_BLOCKS, num_layers)
            if not 1 <= blocks <= num_layers:
                raise StagepipeError(f"--blocks {blocks} must be between 1 and the model's {num_layers} layers")
            base, extra = divmod(num_layers, blocks)
            sizes = [base + (1 if i < extra else 0) for i in range(blocks)]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [(start, start + n) for start, n in zip(starts, sizes)]

    def vision_layer_ranges(self, depth: int) -> list[tuple[int, int]]:
        """Vision layer ranges per vision_block graph, as even as possible."""
        if not 1 <= self.vision_blocks <= depth:
            raise StagepipeError(f"--vision_blocks {self.vision_blocks} must be between 1 and the vision tower's "
                                 f"{depth} layers")
        return replace(self, blocks=self.vision_blocks, layer_split=None).layer_ranges(depth)

    def checked(self) -> "ConvertOptions":
        """The options with kv_dtype and cache_windows resolved; one clear error for an impossible setting."""
        T, C = self.max_input_len, self.max_cache_len
        if T < 1 or C < T:
            raise StagepipeError(f"--max_input_len {T} and --max_cache_len {C}: need 1 <= max_input_len <= "
                                 "max_cache_len")
        if self.precision not in PRECISIONS:
            raise StagepipeError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        kv_dtype = default_kv_dtype(self.precision) if self.kv_dtype == "auto" else self.kv_dtype
        if kv_dtype not in ("float16", "float32"):
            raise StagepipeError(f"--kv_dtype {self.kv_dtype}: choose auto, float16 or float32")
        if self.blocks is not None and self.layer_split:
            raise StagepipeError("--blocks and --layer_split: give one of them")
        return replace(self, kv_dtype=kv_dtype, cache_windows=resolve_cache_windows(self.cache_windows, T, C))


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
