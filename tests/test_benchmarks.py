"""The benchmark scripts' own logic: combining repeated rounds, and the weight-noise bound of quant_bound."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench import combine_repeats
from benchmarks.quant_bound import NoisyReference, cosines, quantizer_error, sequence_logits
from pipeline.runtime.reference import ReferenceModel


def test_combine_repeats_takes_medians_and_the_largest_memory():
    runs = [{"ttft_s": 0.30, "decode_tok_s": 30.0, "peak_rss_mib": 100, "wall_s": 3.0},
            {"ttft_s": 0.50, "decode_tok_s": 20.0, "peak_rss_mib": 120, "wall_s": 4.0},
            {"ttft_s": 0.25, "decode_tok_s": 40.0, "peak_rss_mib": 110, "wall_s": 2.5}]
    r = combine_repeats(runs)
    assert (r["ttft_s"], r["decode_tok_s"], r["peak_rss_mib"]) == (0.30, 30.0, 120)
    assert r["wall_s"] == 3.0  # the other fields: from the run with the median decode rate
    assert [x["decode_tok_s"] for x in r["repeats"]] == [30.0, 20.0, 40.0]  # in the order they ran
    assert combine_repeats(runs[1:2]) is runs[1]
    failed = {"error": "doit run_auto failed"}
    assert combine_repeats([failed]) is failed


def test_noise_free_reference_is_the_reference_and_noise_moves_logits(qwen3_tied):
    ids = [3, 17, 42, 5, 99, 7]
    clean = sequence_logits(NoisyReference(qwen3_tied, 0.0, seed=0), ids)
    np.testing.assert_array_equal(clean, sequence_logits(ReferenceModel(qwen3_tied), ids))
    small = cosines(clean, sequence_logits(NoisyReference(qwen3_tied, 0.01, seed=0), ids))
    large = cosines(clean, sequence_logits(NoisyReference(qwen3_tied, 0.2, seed=0), ids))
    assert 0.9 < small.mean() < 1.0 and large.mean() < small.mean()


def test_quantizer_errors_are_what_4_and_8_bits_give(qwen3_tied):
    probe = NoisyReference(qwen3_tied, 0.0, seed=0)
    names = [n for n in probe.weights.names() if probe._quantized(n)]
    assert any(n.endswith("q_proj.weight") for n in names) and "model.embed_tokens.weight" in names  # tied head
    int8, int4 = quantizer_error(probe, 8, names), quantizer_error(probe, 4, names)
    # Gaussian weights, 32-weight blocks: int8 ~0.5% rms, int4 ~9%, and each bit halves the error
    assert int8 == pytest.approx(0.005, rel=0.3) and int4 == pytest.approx(0.087, rel=0.3)
    assert 10 < int4 / int8 < 25


def test_small_bench_runs_quickly_and_reports_no_targets(tmp_path):
    """`doit bench --small`: the smoke run a newcomer tries; it must work and judge no target."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--small", "--methods", "run_auto,in_memory",
                           "--new_tokens", "4", "--runs_dir", str(tmp_path / "runs"), "--out",
                           str(tmp_path / "bench.json")], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run_auto (doit, summary.json)" in proc.stdout and "targets:" not in proc.stdout
    assert time.perf_counter() - started < 120


def test_bench_cuda_without_cuda_is_one_line_before_any_work(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--small", "--provider", "cuda", "--out",
                           str(tmp_path / "b.json")], cwd=repo, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --provider cuda") and proc.stdout == ""
