"""Entry point: python -m pipeline.quantize (the code lives in pipeline.npu.quantize)."""
import sys

from pipeline.npu.quantize import main

if __name__ == "__main__":
    sys.exit(main())
