"""python -m pipeline.convert --model_path CKPT --onnx_dir OUT [--blocks 4 | --layer_split 7,7,7,7] [...]

Writes OUT/manifest.json, the checkpoint's config and tokenizer files, and prefill/ + decode/ graphs: every
stage at the whole cache (C slots), plus block graphs for smaller attention windows (block0_c128.onnx, ...).
The whole folder is built beside OUT and renamed into place at the end, so OUT is never half-written.
"""

from pipeline.core.cli_args import ArgumentParser
from pipeline.convert.onnx_dir import convert_with
from pipeline.convert.options import ConvertOptions
from pipeline.core.errors import cli_entry
from pipeline.core.options import add_arguments, from_values


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.convert",
                       description="Convert a Qwen2/Qwen3 (or Qwen2.5-VL) checkpoint into split static-shape ONNX "
                                   "graphs.")
    add_arguments(p, ConvertOptions, required=("model_path", "onnx_dir"))
    convert_with(from_values(ConvertOptions, vars(p.parse_args(argv))))


if __name__ == "__main__":
    main()
