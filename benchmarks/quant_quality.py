"""How close fp16/int8/int4 graphs come to fp32 ones: logits cosine per position over one teacher-forced sequence.

    python -m benchmarks.quant_quality [--model_path CKPT | --model trained] [--precision int4] [--tokens 64]

Default checkpoint: the benchmark's random Qwen3-0.6B-shaped one (models/bench-qwen3-0.6b, written if missing);
`--model trained` takes the trained demo model (models/demo-qwen3) and its held-out standard-library text.
Both onnx_dirs are converted if missing or stale (onnx/quality-<model>-<precision>). The same --tokens token ids
(a fixed pseudo-random draw, or the held-out text for the trained model) go through both graph sets in prefill
chunks, and the logits of every position are compared: cosine similarity (mean, min) and how often the top-1 token
agrees. With the trained model, held-out perplexity of both (benchmarks/perplexity.py) is reported too.
Writes runs/bench/quality.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.core.cli_args import ArgumentParser  # noqa: E402
from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.errors import cli_entry  # noqa: E402


def checkpoint_for(model_path: str, model: str = "bench") -> Path:
    """--model_path as given, the trained demo model, or the benchmark's random checkpoint (written if missing)."""
    if model_path:
        return Path(model_path).resolve()
    if model == "trained":
        from pipeline.demo.checkpoint import write_trained_demo
        from pipeline.run.model_source import DEMO_MODEL

        write_trained_demo(REPO / DEMO_MODEL)
        return (REPO / DEMO_MODEL).resolve()
    from benchmarks.bench import BENCH_MODEL, write_bench_checkpoint

    path = (REPO / BENCH_MODEL).resolve()
    write_bench_checkpoint(path)
    return path


def ensure_onnx(model_path: Path, precision: str, max_cache_len: int) -> Path:
    from pipeline.convert.onnx_dir import convert
    from pipeline.convert.staleness import staleness

    onnx_dir = REPO / "onnx" / f"quality-{model_path.name}-{precision}-C{max_cache_len}"
    wanted = {"precision": precision, "max_input_len": 16, "max_cache_len": max_cache_len}
    reason = staleness(onnx_dir, model_path, wanted)
    if reason:
        print(f"converting {model_path} -> {onnx_dir} ({reason}) ...", flush=True)
        convert(model_path, onnx_dir, max_input_len=16, max_cache_len=max_cache_len, precision=precision,
                log=lambda *a: None)
    return onnx_dir


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.quant_quality", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", default="", help="HF checkpoint (default: the benchmark's, written if missing)")
    p.add_argument("--model", choices=["bench", "trained"], default="bench",
                   help="without --model_path: the random 0.6B-shaped checkpoint or the trained demo model")
    p.add_argument("--precision", choices=["int8", "int4", "fp16"], default="int4")
    p.add_argument("--tokens", type=int, default=64, help="sequence length (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "quality.json"))
    a = p.parse_args(argv)
    model_path = checkpoint_for(a.model_path, a.model)
    trained = a.model == "trained" and not a.model_path
    C = max(1024 if trained else 64, 1 << (a.tokens - 1).bit_length())  # perplexity in segments of C tokens
    ref_dir, q_dir = ensure_onnx(model_path, "fp32", C), ensure_onnx(model_path, a.precision, C)
    from benchmarks.perplexity import all_position_logits, held_out_texts, perplexity
    from pipeline.core.jsonfile import load_manifest
    from pipeline.runtime.tokenizer import Tokenizer

    if trained:  # real text: the model's held-out files
        texts = held_out_texts()
        token_ids = Tokenizer.load(ref_dir).encode(texts[0])[:a.tokens]
    else:
        vocab = load_manifest(ref_dir).model.vocab_size
        token_ids = np.random.default_rng(a.seed).integers(0, vocab, a.tokens).tolist()
    t = time.perf_counter()
    ref, quant = all_position_logits(ref_dir, token_ids), all_position_logits(q_dir, token_ids)
    cos = (ref * quant).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(quant, axis=-1))
    top1 = float(np.mean(ref.argmax(-1) == quant.argmax(-1)))
    from benchmarks.bench import cpu_info

    # cpu: int8/int4 MatMulNBits quantize activations with CPU-specific kernels, so results depend on it
    result = {"model_path": str(model_path), "precision": a.precision, "tokens": a.tokens, "seed": a.seed,
              "cpu": cpu_info(),
              "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), "top1_agreement": top1,
              "max_abs_diff": float(np.abs(ref - quant).max()), "seconds": time.perf_counter() - t}
    print(f"{a.precision} vs fp32 logits over {a.tokens} positions of {model_path.name}: cosine mean "
          f"{result['cosine_mean']:.5f}, min {result['cosine_min']:.5f}; top-1 agreement {top1:.1%}")
    if trained:
        result["perplexity_fp32"] = perplexity(ref_dir, texts, 4096)["perplexity"]
        result[f"perplexity_{a.precision}"] = perplexity(q_dir, texts, 4096)["perplexity"]
        print(f"held-out perplexity (4096 tokens): fp32 {result['perplexity_fp32']:.2f}, "
              f"{a.precision} {result[f'perplexity_{a.precision}']:.2f}")
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    main()
