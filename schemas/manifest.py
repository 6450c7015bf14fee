"""manifest.json: everything a stage needs to know about a converted onnx_dir."""
from __future__ import annotations

import math
import posixpath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

MANIFEST_SCHEMA_VERSION = 1
# an additive mask value must drown any attention score: exp(score + mask) underflows to 0 for it
MASK_VALUE_MAX = -1000.0


def _inside_folder(path: str) -> str:
    """A path read from the manifest stays inside the onnx_dir: relative, without '..' (graph paths are opened)."""
    norm = posixpath.normpath(path)
    if not path or path.startswith("/") or "\\" in path or norm == ".." or norm.startswith("../") or norm != path:
        raise ValueError(f"{path!r} is not a plain relative path inside the onnx_dir")
    return path


InsidePath = Annotated[str, AfterValidator(_inside_folder)]
Positive = Annotated[int, Field(ge=1)]


class ModelConfig(BaseModel):
    """The model dimensions the graphs were built for (parsed from the checkpoint's config.json)."""

    architecture: str
    hidden_size: Positive
    intermediate_size: Positive
    num_layers: Positive
    num_attention_heads: Positive
    num_key_value_heads: Positive
    head_dim: Positive
    vocab_size: Positive
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections (Qwen2 always; Qwen3 when attention_bias)
    o_bias: bool  # bias on o_proj (Qwen3 with attention_bias only)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    weights_dtype: str  # what the checkpoint says it stores: bfloat16 / float16 / float32
    bos_token_id: int | None = None
    eos_token_ids: list[int] = []
    # M-RoPE (Qwen2.5-VL's language model): rotary frequencies split into (temporal, height, width) sections of
    # these many frequencies each, rotated by the three rows of (3,1,T) position ids; [] = plain 1-D RoPE
    mrope_section: list[int] = []

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @model_validator(mode="after")
    def _heads_group(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        return self


class VisionConfig(BaseModel):
    """A Qwen2.5-VL vision tower (config.json vision_config) and its image preprocessing."""

    depth: int  # vision layers
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the merger's output: the language model's hidden size
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int  # merge x merge patches become one language-model token
    in_channels: int
    window_size: int  # window attention side, in pixels
    fullatt_block_indexes: list[int]  # layers with full attention; the others attend within their window
    rope_theta: float
    rms_norm_eps: float
    image_token_id: int  # <|image_pad|>
    vision_start_token_id: int
    vision_end_token_id: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_values(self) -> int:
        """Values per flattened pixel patch: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2


class TensorSpec(BaseModel):
    name: str
    shape: list[Positive]
    dtype: str


class GraphSpec(BaseModel):
    file: InsidePath  # relative to the onnx_dir, e.g. "decode/block0.onnx"
    weights_files: list[InsidePath]  # external data files the graph reads, relative to the onnx_dir
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class BlockSpec(BaseModel):
    index: int = Field(ge=0)
    layer_start: int = Field(ge=0)  # first layer (inclusive)
    layer_end: int  # last layer (exclusive)

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


class VisionSpec(BaseModel):
    """manifest.vision: the vision graphs of a VL model, for one fixed image size."""

    config: VisionConfig
    image_size: int  # every image is resized to image_size x image_size
    grid: list[int]  # [t, h, w] patches: transformers' image_grid_thw
    num_patches: int  # rows of pixel_patches (t * h * w)
    image_tokens: int  # rows of image_embeds: <|image_pad|> tokens per image
    window_patches: list[int]  # patches per attention window, in the window order the vision blocks use
    blocks: list[BlockSpec]  # vision layers per vision_block graph
    precision: Literal["fp32", "fp16"]
    graphs: dict[str, GraphSpec]  # "vision_patch", "vision_block0".., "vision_merger"


class SourceFile(BaseModel):
    size: int
    mtime_ns: int


class QuantizationSpec(BaseModel):
    """How a quantized onnx_dir was made from others (python -m pipeline.quantize, python -m pipeline.mixed)."""

    scheme: str  # w8a8, w8a16, w4a16 (QDQ), or mixed
    source_fingerprint: str  # graphs_fingerprint of the fp32 onnx_dir it was made from
    stages: dict[str, str]  # stage -> what its graphs are: "w8a8" (quantized here), "fp32", "int4" (copied), ...
    keep_float: list[str] = []  # graph parts left in float (pipeline/npu/graph_parts.py): mask, rope, norms
    calibration_runs: list[str] = []  # the run folders the activation ranges were calibrated on
    calibration_samples: dict[str, int] = {}  # stage -> samples calibrated on


class WrittenFile(BaseModel):
    """A file the converter wrote: checked before a run opens it. Graphs are small and always hashed; a
    weights file is hashed again only when its size or mtime moved (a 2 GB file is not reread every run)."""

    size: int = Field(ge=0)
    mtime_ns: int
    sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = MANIFEST_SCHEMA_VERSION
    stagepipe_version: str
    graph_format: int = 0  # pipeline.graphs.GRAPH_FORMAT of the converter that wrote it (0: before it was recorded)
    model: ModelConfig
    # int8/int4: weight-only quantized linear layers (MatMulNBits); qdq-*: QuantizeLinear/DequantizeLinear graphs
    # (python -m pipeline.quantize); mixed: each stage's graphs from another onnx_dir (python -m pipeline.mixed)
    precision: Literal["fp32", "fp16", "int8", "int4", "qdq-w8a8", "qdq-w8a16", "qdq-w4a16", "mixed"]
    kv_dtype: Literal["float16", "float32"]
    max_input_len: Positive  # T of the prefill graphs
    max_cache_len: Positive  # C: KV cache slots
    # Attention windows the block graphs exist for, ascending, the last = max_cache_len. A step runs the block
    # graphs of the smallest window that holds past_len + q_len slots, so early tokens do not pay for all C slots.
    # Graph sets: "prefill"/"decode" (every stage, window C) and "prefill_c<W>"/"decode_c<W>" (blocks, window W).
    cache_windows: list[int] = []  # [] (older manifests): [max_cache_len]
    # "window": the block graphs of a window W take only the cache slots [0, W) as (Lk,1,KV,W,D) (convert
    # --cache_input window); "whole": the (Lk,1,KV,C,D) cache, sliced inside
    cache_input: Literal["whole", "window"] = "whole"
    # the block graphs take the RoPE tables cos/sin (T, D) in place of position_ids (convert --rope_input); token_embed
    # writes them to the step folder
    rope_input: bool = False
    mask_value: float  # what attention_mask holds where a position is masked (finite, <= MASK_VALUE_MAX)
    opset: Positive
    blocks: list[BlockSpec]
    graphs: dict[str, dict[str, GraphSpec]]  # graph set -> stage ("embed", "block0", "output") -> graph
    source_path: str  # where the checkpoint was read from (informational)
    source_files: dict[str, SourceFile]  # size/mtime of each source file: a cheap staleness check
    source_fingerprint: str  # sha256 over config.json and the weight files' content
    graphs_fingerprint: str  # sha256 over every graph and weight byte written
    tokenizer_files: list[str]
    nonstandard_ops: list[str] = []  # "domain:Op" outside the default ONNX domain (int8/int4: MatMulNBits)
    quantization: QuantizationSpec | None = None  # qdq-* and mixed onnx_dirs: how they were made
    vision: VisionSpec | None = None  # VL models: the vision tower's graphs (None for text models)
    # every graph and weights file written, by path in the onnx_dir ({} in manifests written before: unchecked)
    files: dict[InsidePath, WrittenFile] = {}

    @model_validator(mode="after")
    def _consistent(self):
        """Values a run relies on: one line naming the first that cannot be right."""
        T, C = self.max_input_len, self.max_cache_len
        if C < T:
            raise ValueError(f"max_cache_len {C} is smaller than max_input_len {T}")
        if self.cache_windows and (self.cache_windows != sorted(set(self.cache_windows))
                                   or self.cache_windows[0] < 1 or self.cache_windows[-1] != C):
            raise ValueError(f"cache_windows {self.cache_windows} must ascend from >= 1 to max_cache_len {C}")
        if not (math.isfinite(self.mask_value) and self.mask_value <= MASK_VALUE_MAX):
            raise ValueError(f"mask_value {self.mask_value} must be finite and <= {MASK_VALUE_MAX:g}, far below "
                             "any attention score")
        if not self.blocks:
            raise ValueError("blocks is empty; the graphs need at least one decoder block")
        layer = 0
        for i, b in enumerate(self.blocks):
            if b.index != i or b.layer_start != layer or b.layer_end <= b.layer_start:
                raise ValueError(f"blocks[{i}] (index {b.index}, layers {b.layer_start}..{b.layer_end}) does not "
                                 f"continue the blocks before it (block {i} from layer {layer})")
            layer = b.layer_end
        if layer != self.model.num_layers:
            raise ValueError(f"blocks cover layers 0..{layer}, the model has {self.model.num_layers}")
        for name in ("prefill", "decode"):
            missing = [s for s in self.stage_names() if s not in self.graphs.get(name, {})]
            if missing:
                raise ValueError(f"graphs[{name!r}] has no {missing[0]} graph")
        return self

    def windows(self) -> list[int]:
        return self.cache_windows or [self.max_cache_len]

    def stage_names(self) -> list[str]:
        return ["embed"] + [f"block{b.index}" for b in self.blocks] + ["output"]
