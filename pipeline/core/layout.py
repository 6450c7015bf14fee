"""The file contract: every file and folder name of an onnx_dir, a run folder, a step folder and a KV cache
folder. Every other module imports these names; none spells them.

    onnx_dir/   manifest.json, config.json, generation_config.json, tokenizer files,
                prefill/ and decode/: <stage>.onnx (whole cache), block<K>_c<W>.onnx (attention window W),
                <stage>.data (weights; decode's are hard links of prefill's)
                vision/ (VL models): vision_patch, vision_block<K>, vision_merger .onnx + .data
    run folder/ run.json, summary.json, .lock, .doit.db, kv_cache/, vision/ (image runs), step_0000/, ...
    step_NNNN/  meta.json, input_ids.npy, attention_mask.npy, position_ids.npy, hidden_block0..N.npy,
                logits.npy, next_token_id.txt, next_token.txt (cos.npy, sin.npy: graphs with rope inputs)
    vision/     meta.json, pixel_patches.npy, vision_hidden0..N.npy, image_embeds.npy (the image step)
    kv_cache/   cache.json, past_key_block<K>.npy, past_value_block<K>.npy
    run set/    run_set.json, set_summary.json, logs/run_NNNN.log, run_0000/, run_0001/, ... (run folders)
    calibration/ calibration.json, <graph set>/sample_NNNN.npz or <graph set>/<input>/NNNN.npy + dataset.txt
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import StagepipeError

# -- onnx_dir ------------------------------------------------------------------------------------------------------
MANIFEST = "manifest.json"
MODEL_CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_CONFIG, "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", CHAT_TEMPLATE)
MODES = ("prefill", "decode")  # T = max_input_len tokens a step, and T = 1


def graph_set(mode: str, window: int, max_cache_len: int) -> str:
    """Key in manifest.graphs: "prefill"/"decode" at the whole cache (every stage), "<mode>_c<W>" for the block
    graphs of a smaller attention window W."""
    return mode if window == max_cache_len else f"{mode}_c{window}"


def graph_set_window(name: str, max_cache_len: int) -> int:
    """The attention window of a graph set named by graph_set."""
    return int(name.split("_c")[1]) if "_c" in name else max_cache_len


def graph_set_mode(name: str) -> str:
    """The mode of a graph set named by graph_set: "prefill" or "decode"."""
    return name.split("_c")[0]


def graph_file(mode: str, stage: str, window: int, max_cache_len: int) -> str:
    """A graph's path in the onnx_dir: decode/block0.onnx, decode/block0_c128.onnx."""
    suffix = "" if window == max_cache_len else f"_c{window}"
    return f"{mode}/{stage}{suffix}.onnx"


def weights_file(mode: str, stage: str) -> str:
    """The external-data file a stage's graphs in one mode folder read (all windows share it)."""
    return f"{mode}/{stage}.data"


VISION = "vision"  # the vision graphs' folder in an onnx_dir, and the image step's folder in a run folder
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def vision_stage_names(blocks: int) -> list[str]:
    """The vision stages in pipeline order: vision_patch, vision_block0..N-1, vision_merger."""
    return ["vision_patch"] + [f"vision_block{k}" for k in range(blocks)] + ["vision_merger"]


def vision_graph_file(stage: str) -> str:
    return f"{VISION}/{stage}.onnx"


def vision_weights_file(stage: str) -> str:
    return f"{VISION}/{stage}.data"


# -- run folder ----------------------------------------------------------------------------------------------------
RUN_JSON = "run.json"
SUMMARY_JSON = "summary.json"
LOCK_FILE = ".lock"
DOIT_DB = ".doit.db"
KV_DIR = "kv_cache"
_STEP = re.compile(r"step_(\d{4,})")


def step_name(n: int) -> str:
    return f"step_{n:04d}"


def step_number(name: str) -> int | None:
    """N of a folder named step_NNNN; None for any other name (step_0003.bak is not a step)."""
    return _number_in(_STEP, name)


def _number_in(pattern: re.Pattern, name: str) -> int | None:
    m = pattern.fullmatch(name)
    return int(m.group(1)) if m else None


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's step folders in step order; other folders and files are ignored."""
    found = [(step_number(d.name), d) for d in Path(run_dir).iterdir() if d.is_dir()]
    return [d for n, d in sorted((n, d) for n, d in found if n is not None)]


def looks_like_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_JSON).is_file() or any(step_number(p.name) is not None
                                                                 for p in path.iterdir()))


# -- step folder ---------------------------------------------------------------------------------------------------
META = "meta.json"
INPUT_IDS = "input_ids.npy"
ATTENTION_MASK = "attention_mask.npy"
POSITION_IDS = "position_ids.npy"
LOGITS = "logits.npy"
NEXT_TOKEN_ID = "next_token_id.txt"
NEXT_TOKEN_TEXT = "next_token.txt"
INPUT_FILES = (INPUT_IDS, ATTENTION_MASK, POSITION_IDS)
# RoPE tables (T, D) of the step's positions, for block graphs that take them as inputs (convert --rope_input)
ROPE_COS = "cos.npy"
ROPE_SIN = "sin.npy"
# a block's new K/V rows: not step files (they go into the cache slots), but named like them where tools report them
PRESENT_KEY = "present_key"
PRESENT_VALUE = "present_value"
_HIDDEN = re.compile(r"hidden_block(\d+)\.npy")


def hidden_file(k: int) -> str:
    """The hidden states entering block k (hidden_block0 comes from embed; hidden_block{N} feeds the output)."""
    return f"hidden_block{k}.npy"


def hidden_index(name: str) -> int | None:
    return _number_in(_HIDDEN, name)


def tensor_sort_key(name: str):
    """Pipeline order: an image step's pixel_patches, vision_hidden0..N, image_embeds; input_ids, attention_mask,
    position_ids, hidden_block0..N, logits; then anything else."""
    if vision_tensor_index(name) is not None:
        return (-1, vision_tensor_index(name), "")
    if name in INPUT_FILES:
        return (0, INPUT_FILES.index(name), "")
    if hidden_index(name) is not None:
        return (1, hidden_index(name), "")
    return (2, 0, "") if name == LOGITS else (3, 0, name)


def writer_stage(name: str) -> str | None:
    """The stage that writes a step tensor: hidden_block0 <- embed, hidden_block{k+1} <- block{k}, logits <- output;
    in an image step pixel_patches <- preprocess, vision_hidden0 <- vision_patch, vision_hidden{k+1} <-
    vision_block{k}, image_embeds <- vision_merger."""
    v = vision_tensor_index(name)
    if v is not None:
        return {0: "preprocess", 1: "vision_patch", 10 ** 6: "vision_merger"}.get(v, f"vision_block{v - 2}")
    k = hidden_index(name)
    if k is not None:
        return "embed" if k == 0 else f"block{k - 1}"
    return "output" if name == LOGITS else None


def stage_sort_key(stage: str):
    """Pipeline order of stage names: an image step's preprocess, vision_patch, vision_block0..N, vision_merger;
    embed, block0..N, output; then anything else."""
    vision = {"preprocess": -1, "vision_patch": 0, "vision_merger": 10 ** 6}
    v = re.fullmatch(r"vision_block(\d+)", stage)
    if stage in vision or v:
        return (-1, vision.get(stage) if not v else int(v.group(1)) + 1, "")
    m = re.fullmatch(r"block(\d+)", stage)
    return (0, 0, "") if stage == "embed" else (1, int(m.group(1)), "") if m else (2, 0, "") if stage == "output" \
        else (3, 0, stage)


@dataclass
class StepPaths:
    """Where a step's files live; each can be pointed elsewhere (the stages' --hidden_in, --logits, ... flags)."""

    step_dir: Path
    meta: Path | None = None
    input_ids: Path | None = None
    attention_mask: Path | None = None
    position_ids: Path | None = None
    logits: Path | None = None
    next_token_file: Path | None = None
    next_token_text: Path | None = None
    rope_cos: Path | None = None
    rope_sin: Path | None = None

    def __post_init__(self):
        d = self.step_dir = Path(self.step_dir)
        self.meta = Path(self.meta or d / META)
        self.input_ids = Path(self.input_ids or d / INPUT_IDS)
        self.attention_mask = Path(self.attention_mask or d / ATTENTION_MASK)
        self.position_ids = Path(self.position_ids or d / POSITION_IDS)
        self.logits = Path(self.logits or d / LOGITS)
        self.next_token_file = Path(self.next_token_file or d / NEXT_TOKEN_ID)
        self.next_token_text = Path(self.next_token_text or d / NEXT_TOKEN_TEXT)
        self.rope_cos = Path(self.rope_cos or d / ROPE_COS)
        self.rope_sin = Path(self.rope_sin or d / ROPE_SIN)

    def hidden(self, k: int) -> Path:
        return self.step_dir / hidden_file(k)


def read_token_file(path: Path) -> int:
    """The token id in a next_token_id.txt."""
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        raise StagepipeError(f"{path}: expected one integer token id; fix the file or rerun the output stage") from None


def token_file_text(token_id: int) -> str:
    return f"{token_id}\n"


# -- the image step (a run's vision/ folder) ----------------------------------------------------------------------
PIXEL_PATCHES = "pixel_patches.npy"
IMAGE_EMBEDS = "image_embeds.npy"


def vision_hidden_file(k: int) -> str:
    """The vision hidden states entering vision_block k (vision_hidden0 comes from vision_patch; the last one
    feeds vision_merger)."""
    return f"vision_hidden{k}.npy"


_VISION_HIDDEN = re.compile(r"vision_hidden(\d+)\.npy")


def vision_tensor_index(name: str) -> int | None:
    """Order of an image step's tensor: pixel_patches 0, vision_hidden{k} k+1, image_embeds last; None otherwise."""
    if name == PIXEL_PATCHES:
        return 0
    if name == IMAGE_EMBEDS:
        return 10 ** 6
    m = _VISION_HIDDEN.fullmatch(name)
    return int(m.group(1)) + 1 if m else None


# -- KV cache folder -----------------------------------------------------------------------------------------------
CACHE_JSON = "cache.json"
KV_KINDS = ("key", "value")
_KV = re.compile(r"past_(key|value)_block(\d+)\.npy")


def kv_file(kind: str, k: int) -> str:
    return f"past_{kind}_block{k}.npy"


def kv_files(kv_dir: Path) -> list[Path]:
    """The cache files in a kv_cache folder, by block then kind."""
    found = [(int(m.group(2)), m.group(1), p) for p in Path(kv_dir).iterdir() if (m := _KV.fullmatch(p.name))]
    return [p for _, _, p in sorted(found)]


def looks_like_kv_dir(path: Path) -> bool:
    return path.is_dir() and ((path / CACHE_JSON).is_file() or any(path.glob(kv_file("key", "*"))))


# -- run set: one run folder per prompt ---------------------------------------------------------------------------
RUN_SET_JSON = "run_set.json"
SET_SUMMARY_JSON = "set_summary.json"
SET_LOGS = "logs"
_SET_RUN = re.compile(r"run_(\d{4,})")


def set_run_name(i: int) -> str:
    return f"run_{i:04d}"


def set_log_file(i: int) -> str:
    return f"{SET_LOGS}/run_{i:04d}.log"


def set_run_dirs(root: Path) -> list[Path]:
    """A run set's run folders in order; a single run folder given as a set is a set of one."""
    root = Path(root)
    if (root / RUN_JSON).is_file():
        return [root]
    found = [(int(m.group(1)), d) for d in root.iterdir() if d.is_dir() and (m := _SET_RUN.fullmatch(d.name))]
    return [d for _, d in sorted(found)]


# -- calibration data and quantized onnx_dirs ---------------------------------------------------------------------
CALIBRATION_JSON = "calibration.json"
CALIBRATION_LIST = "dataset.txt"  # npy-list format: one line per sample, its input files in graph input order
QUANTIZE_REPORT = "quantize_report.json"
MIXED_ASSIGNMENT = "assignment.json"


def calibration_sample(i: int) -> str:
    return f"sample_{i:04d}.npz"


def calibration_npy(input_name: str, i: int) -> str:
    return f"{input_name}/{i:04d}.npy"
