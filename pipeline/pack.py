"""Entry point: python -m pipeline.pack (the code lives in pipeline.tools.pack)."""
import sys

from pipeline.tools.pack import main

if __name__ == "__main__":
    sys.exit(main())
