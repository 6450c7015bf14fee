"""Entry point: python -m pipeline.inspect (the code lives in pipeline.tools.inspect)."""
import sys

from pipeline.tools.inspect import main

if __name__ == "__main__":
    sys.exit(main())
