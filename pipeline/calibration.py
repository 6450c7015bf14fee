"""Entry point: python -m pipeline.calibration (the code lives in pipeline.npu.calibration)."""
import sys

from pipeline.npu.calibration import main

if __name__ == "__main__":
    sys.exit(main())
