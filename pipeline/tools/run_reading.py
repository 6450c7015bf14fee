"""What the tools read from run folders: which kind of folder a path is, a step's meta and token, the tokenizer
a run used, and tensor statistics computed in chunks (a big logits file or cache is never loaded twice over)."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

from pipeline.core import layout
from pipeline.core.errors import StagepipeError
from pipeline.core.jsonfile import load_model_file
from pipeline.core.layout import step_number, tensor_sort_key
from pipeline.tools.report import fmt_num
from schemas.run import StepMeta

CHUNK = 1 << 22  # elements reduced at a time


def step_tensor_files(step_dir: Path) -> list[Path]:
    return sorted((p for p in Path(step_dir).glob("*.npy") if p.is_file()), key=lambda p: tensor_sort_key(p.name))


def classify(path: Path) -> str:
    """'run', 'step', 'kv_cache' or 'npy'; a one-line StagepipeError for anything else."""
    path = Path(path)
    if not path.exists():
        raise StagepipeError(f"{path}: not found")
    if path.is_file():
        if path.suffix == ".npy":
            return "npy"
        raise StagepipeError(f"{path}: is a file; give a run folder, a step folder, a kv_cache folder or a .npy file")
    if layout.looks_like_kv_dir(path):
        return "kv_cache"
    if (path / layout.META).is_file() or step_number(path.name) is not None:
        return "step"
    if layout.looks_like_run_dir(path):
        return "run"
    raise StagepipeError(f"{path}: not a run folder (run.json, step_NNNN/), a step folder (meta.json) or a "
                         "kv_cache folder (cache.json)")


def read_json(path: Path) -> dict | None:
    """A JSON file as a dict, None when absent; a corrupt file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StagepipeError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise StagepipeError(f"{path}: expected a JSON object")
    return data


def is_image_step(step_dir: Path) -> bool:
    """A VL run's vision/ folder (its meta.json is a VisionMeta)."""
    meta = read_json(Path(step_dir) / layout.META)
    return bool(meta) and meta.get("kind") == "vision"


def load_step_meta(step_dir: Path) -> StepMeta | None:
    """A step's meta.json; None when absent or for an image step (whose meta is a VisionMeta)."""
    path = Path(step_dir) / layout.META
    return load_model_file(path, StepMeta) if path.is_file() and not is_image_step(step_dir) else None


def step_next_token(step_dir: Path, meta: StepMeta | None) -> int | None:
    """The token the step sampled: next_token_id.txt (what the next step reads), else meta.json."""
    path = Path(step_dir) / layout.NEXT_TOKEN_ID
    if path.is_file():
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
    return meta.next_token_id if meta else None


def find_onnx_dir(run_dir: Path, settings: dict | None) -> Path | None:
    """run.json's onnx_dir: as written (absolute or relative to the cwd), else relative to a folder above the run."""
    if not settings or not settings.get("onnx_dir"):
        return None
    onnx_dir = Path(settings["onnx_dir"])
    if onnx_dir.is_absolute() or onnx_dir.is_dir():
        return onnx_dir if onnx_dir.is_dir() else None
    for base in Path(run_dir).resolve().parents:
        if (base / onnx_dir).is_dir():
            return base / onnx_dir
    return None


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, mtime_ns: int, size: int):
    from pipeline.runtime.tokenizer import load_optional_tokenizer

    return load_optional_tokenizer(path)


def run_tokenizer(run_dir: Path, settings: dict | None = None):
    """The tokenizer of the run's onnx_dir, or None (text columns then show '-'). Loaded once per file."""
    settings = settings if settings is not None else read_json(Path(run_dir) / layout.RUN_JSON)
    onnx_dir = find_onnx_dir(run_dir, settings)
    path = onnx_dir / layout.TOKENIZER_JSON if onnx_dir else None
    if path is None or not path.is_file():
        return None
    st = path.stat()
    try:
        return _tokenizer(str(path.resolve()), st.st_mtime_ns, st.st_size)
    except StagepipeError:  # a broken tokenizer.json only costs the text column
        return None


def token_text(tokenizer, token_id: int | None) -> str | None:
    if tokenizer is None or token_id is None:
        return None
    try:
        return tokenizer.token_text(token_id)
    except StagepipeError:
        return None


def abbreviate_ids(ids: list[int], keep: int = 3) -> str:
    if len(ids) <= keep + 1:
        return " ".join(map(str, ids))
    return f"{' '.join(map(str, ids[:keep - 1]))} … {ids[-1]} [{len(ids)}]"


# -- tensors ----------------------------------------------------------------------------------------------------------
def open_npy(path: Path) -> np.ndarray:
    path = Path(path)
    try:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            if "pickle" in str(e).lower():
                raise
            return np.load(path, allow_pickle=False)  # e.g. an empty array cannot be memory-mapped
    except FileNotFoundError:
        raise StagepipeError(f"{path}: not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise StagepipeError(f"{path}: not a readable .npy ({e})") from None


def array_stats(arr: np.ndarray) -> dict:
    """shape/dtype, NaN/Inf counts and min/max/mean/std of the finite values, reduced chunk by chunk."""
    flat = arr.reshape(-1)
    is_float = np.issubdtype(arr.dtype, np.floating)
    nan = inf = 0
    n, mean, m2 = 0, 0.0, 0.0
    lo = hi = None
    for start in range(0, flat.size, CHUNK):
        c = np.asarray(flat[start:start + CHUNK])
        if is_float:
            bad_nan, bad_inf = np.isnan(c), np.isinf(c)
            nan += int(bad_nan.sum())
            inf += int(bad_inf.sum())
            if nan or inf:
                c = c[~(bad_nan | bad_inf)]
        if c.size == 0:
            continue
        c = c.astype(np.float64)
        c_min, c_max, c_mean = float(c.min()), float(c.max()), float(c.mean())
        c_m2 = float(np.square(c - c_mean).sum())
        lo = c_min if lo is None else min(lo, c_min)
        hi = c_max if hi is None else max(hi, c_max)
        total = n + c.size
        delta = c_mean - mean
        mean += delta * c.size / total
        m2 += c_m2 + delta * delta * n * c.size / total
        n = total
    if lo is not None and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        lo, hi = int(lo), int(hi)
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "min": lo, "max": hi,
            "mean": mean if n else None, "std": math.sqrt(m2 / n) if n else None, "nan": nan, "inf": inf,
            "finite_count": n, "size": int(flat.size)}


def file_stats(path: Path) -> dict:
    path = Path(path)
    try:
        stats = array_stats(open_npy(path))
    except StagepipeError as e:
        stats = {"error": str(e)}
    return {"file": path.name, **stats}


TENSOR_HEADERS = ["file", "shape", "dtype", "min", "max", "mean", "std", "nan", "inf"]


def tensor_rows(stats: list[dict]) -> list[list]:
    rows = []
    for s in stats:
        if "error" in s:
            rows.append([s["file"], "error: " + s["error"]] + [""] * 7)
        else:
            rows.append([s["file"], "x".join(map(str, s["shape"])) or "scalar", s["dtype"], fmt_num(s["min"]),
                         fmt_num(s["max"]), fmt_num(s["mean"]), fmt_num(s["std"]), s["nan"], s["inf"]])
    return rows


