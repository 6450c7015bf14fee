"""Stage 2..N+1: decoder block K of one step; stores the step's new K/V in the cache slots it owns."""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import StagepipeError, cli_entry
from pipeline.runtime.kv_cache import KVCacheDir, block_shape, open_cache_file
from pipeline.runtime.stage_ops import block
from stages.common import open_backend, stage_parser, step_paths


@cli_entry
def main(argv=None):
    p = stage_parser("python -m stages.block", __doc__.split("\n")[0])
    p.add_argument("--block", type=int, required=True, help="block index K")
    p.add_argument("--kv_dir", type=Path, default=None, help="the run's kv_cache folder (created if missing)")
    p.add_argument("--past_key", type=Path, default=None, help="a (Lk,1,KV,C,D) .npy to use instead of --kv_dir")
    p.add_argument("--past_value", type=Path, default=None, help="likewise for values")
    p.add_argument("--hidden_in", type=Path, default=None, help="default STEP_DIR/hidden_block{K}.npy")
    p.add_argument("--hidden_out", type=Path, default=None, help="default STEP_DIR/hidden_block{K+1}.npy")
    a = p.parse_args(argv)
    backend = open_backend(a)
    m = backend.manifest
    if not 0 <= a.block < len(m.blocks):
        raise StagepipeError(f"--block {a.block}: this model has blocks 0..{len(m.blocks) - 1}")
    if a.past_key or a.past_value:
        if not (a.past_key and a.past_value):
            raise StagepipeError("--past_key and --past_value go together")
        shape = block_shape(m, a.block)
        past_key = open_cache_file(a.past_key, shape, m.kv_dtype)
        past_value = open_cache_file(a.past_value, shape, m.kv_dtype)
    elif a.kv_dir:
        kv = KVCacheDir(a.kv_dir, m).open(create=True)
        past_key, past_value = kv.past(a.block)
    else:
        raise StagepipeError("give --kv_dir (the run's kv_cache folder) or --past_key/--past_value")
    skipped = []
    meta = block(backend, step_paths(a), a.block, past_key, past_value, a.hidden_in, a.hidden_out,
                 on_skip=skipped.append)
    past_key.flush()
    past_value.flush()
    print(skipped[0] if skipped else f"{a.step_dir}: block {a.block} done, cache slots {meta.past_len}.."
                                     f"{meta.next_past_len - 1} written")


if __name__ == "__main__":
    main()
