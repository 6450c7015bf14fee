"""Entry point: python -m pipeline.mixed (the code lives in pipeline.npu.mixed)."""
import sys

from pipeline.npu.mixed import main

if __name__ == "__main__":
    sys.exit(main())
