"""Entry point: python -m pipeline.ops (the code lives in pipeline.tools.ops)."""
import sys

from pipeline.tools.ops import main

if __name__ == "__main__":
    sys.exit(main())
