"""Entry point: python -m pipeline.compare (the code lives in pipeline.tools.compare)."""
import sys

from pipeline.tools.compare import main

if __name__ == "__main__":
    sys.exit(main())
