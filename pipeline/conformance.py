"""Entry point: python -m pipeline.conformance (the code lives in pipeline.tools.conformance)."""
import sys

from pipeline.tools.conformance import main

if __name__ == "__main__":
    sys.exit(main())
