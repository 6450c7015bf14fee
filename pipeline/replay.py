"""Entry point: python -m pipeline.replay (the code lives in pipeline.tools.replay)."""
import sys

from pipeline.tools.replay import main

if __name__ == "__main__":
    sys.exit(main())
