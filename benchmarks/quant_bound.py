"""How much weight error a checkpoint's logits tolerate, next to what any b-bit code must make.

    python -m benchmarks.quant_bound [--model_path CKPT] [--tokens 64] [--errors 0.005,0.01,0.02]

The numpy reference runs one teacher-forced sequence twice: once as is, once with every matrix that int8/int4
quantizes (the linear layers and the output head) perturbed by Gaussian noise of relative rms e
(noise std = e * rms(W)). It prints the logits cosine for each e, and the relative rms error our own int8 and
int4 quantizers make on those matrices.

Why this bounds int4: the random checkpoints draw weights i.i.d. Gaussian, and by rate-distortion theory no
code spending R bits per weight reconstructs an i.i.d. Gaussian with relative rms error below 2^-R. An int4
MatMulNBits weight with one float32 scale per 32 weights spends R = 5 bits, so its error is at least 1/32.
If the cosine at e = 1/32 is already below a target, no weight-only quantization at that rate can reach it
there. Writes runs/bench/quant_bound.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.quant_quality import checkpoint_for  # noqa: E402
from pipeline.core.cli_args import ArgumentParser  # noqa: E402
from pipeline.core.atomic import write_json  # noqa: E402
from pipeline.core.errors import cli_entry  # noqa: E402
from pipeline.runtime.reference import ReferenceModel  # noqa: E402

QUANTIZED_SUFFIXES = ("_proj.weight", "lm_head.weight")


class NoisyReference(ReferenceModel):
    """The reference with Gaussian noise of relative rms `error` on the matrices the quantizers touch."""

    def __init__(self, model_dir: Path, error: float, seed: int):
        super().__init__(model_dir)
        self.error, self.seed, self._cache = error, seed, {}

    def _w(self, name: str) -> np.ndarray:
        # a per-instance cache: the base class's lru_cache would keep every instance's 2.4 GB alive
        if name not in self._cache:
            w = self.weights.get(name)
            if self.error and self._quantized(name):
                rng = np.random.default_rng([self.seed, *name.encode()])
                rms = np.sqrt(np.mean(np.square(w, dtype=np.float64)))
                w = w + (self.error * rms) * rng.standard_normal(w.shape, dtype=np.float32)
            self._cache[name] = w
        return self._cache[name]

    def _quantized(self, name: str) -> bool:
        head = name == "model.embed_tokens.weight" and self.config.tie_word_embeddings
        return head or name.endswith(QUANTIZED_SUFFIXES)

    def embed(self, input_ids):
        # a tied head is noisy in output() while the lookup stays exact, as in the int4 graphs
        return self.weights.get("model.embed_tokens.weight")[np.asarray(input_ids, dtype=np.int64)]


def sequence_logits(model: ReferenceModel, token_ids: list[int]) -> np.ndarray:
    """(T, V) logits of one prefill over token_ids (no cache)."""
    c, T = model.config, len(token_ids)
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)[None, None]
    empty = np.zeros((c.num_layers, 1, c.num_key_value_heads, 0, c.head_dim), np.float32)
    hidden = model.embed(np.asarray([token_ids]))
    hidden, _, _ = model.block(range(c.num_layers), hidden, mask, np.arange(T)[None], empty, empty)
    return model.output(hidden)[0]


def quantizer_error(model: ReferenceModel, bits: int, names: list[str]) -> float:
    """Relative rms error of pipeline.quantize on these matrices (what the int8/int4 graphs carry)."""
    from pipeline.convert.quantize import block_size_for, dequantize_rows, quantize_rows

    err = ref = 0.0
    for name in names:
        w = model.weights.get(name)
        packed, scales = quantize_rows(w, bits, block_size_for(w.shape[1], name))
        err += float(np.sum(np.square(dequantize_rows(packed, scales, bits) - w, dtype=np.float64)))
        ref += float(np.sum(np.square(w, dtype=np.float64)))
    return float(np.sqrt(err / ref))


def error_list(text: str) -> list[float]:
    """--errors: comma-separated relative errors >= 0."""
    try:
        errors = [float(e) for e in text.split(",")]
    except ValueError:
        errors = []
    if not errors or min(errors) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give relative errors >= 0, comma-separated (0.01,0.02)")
    return errors


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m benchmarks.quant_bound", description=__doc__.split("\n")[0])
    p.add_argument("--model_path", default="", help="HF checkpoint (default: the benchmark's, written if missing)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--errors", type=error_list, default="0.0025,0.0053,0.01,0.0175,0.02,0.03125,0.0625,0.087",
                   help="relative rms weight errors to try, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "quant_bound.json"))
    a = p.parse_args(argv)
    model_path = checkpoint_for(a.model_path)
    clean = NoisyReference(model_path, 0.0, a.seed)
    token_ids = np.random.default_rng(a.seed).integers(0, clean.config.vocab_size, a.tokens).tolist()
    t = time.perf_counter()
    ref = sequence_logits(clean, token_ids)
    names = [n for n in clean.weights.names() if clean._quantized(n)]
    measured = {f"int{bits}": quantizer_error(clean, bits, names) for bits in (8, 4)}
    del clean
    print("relative rms weight error of our quantizers: "
          + ", ".join(f"{k} {v:.4f}" for k, v in measured.items()), flush=True)
    rows = []
    for error in a.errors:
        cos = cosines(ref, sequence_logits(NoisyReference(model_path, error, a.seed), token_ids))
        rows.append({"weight_error": error, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
        print(f"weight error {error:.4f}: logits cosine mean {cos.mean():.5f}, min {cos.min():.5f}", flush=True)
    write_json(a.out, {"model_path": str(model_path), "tokens": a.tokens, "seed": a.seed,
                       "quantizer_weight_error": measured, "noise": rows,
                       "seconds": time.perf_counter() - t})
    return 0


if __name__ == "__main__":
    main()
