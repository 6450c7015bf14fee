"""python -m pipeline.run_set: see pipeline/run/run_set.py."""
import sys

from pipeline.run.run_set import main

if __name__ == "__main__":
    sys.exit(main())
