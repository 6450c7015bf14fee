"""The image step of a VL model: image -> pixel_patches.npy -> each vision stage's output -> image_embeds.npy.

    python -m stages.vision --step_dir runs/x/vision --onnx_dir onnx/qwen2.5-vl --image cat.jpg
    python -m stages.vision --step_dir runs/x/vision --onnx_dir ... --stage vision_block1   # replay one stage

Then token_embed --image_embeds runs/x/vision/image_embeds.npy puts the image into the prompt.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import cli_entry
from pipeline.runtime.vision_stage import vision_step
from stages.common import open_backend, stage_parser


@cli_entry
def main(argv=None):
    p = stage_parser("python -m stages.vision", __doc__.split("\n")[0])
    p.add_argument("--image", type=Path, default=None,
                   help="the image file (any format Pillow reads); optional when the folder's meta.json has it")
    p.add_argument("--stage", default=None,
                   help="run only this stage: preprocess, vision_patch, vision_block<K> or vision_merger "
                        "(default: all, skipping those already done on the same inputs)")
    a = p.parse_args(argv)
    meta = vision_step(open_backend(a), a.step_dir, a.image, a.stage)
    ran = ", ".join(f"{k} {v.seconds:.2f}s" for k, v in meta.stages.items())
    print(f"{a.step_dir}: {meta.image_tokens} image tokens ({ran})")


if __name__ == "__main__":
    main()
