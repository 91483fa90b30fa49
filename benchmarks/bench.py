"""Thin entry point: `python benchmarks/bench.py --shape phi-3-mini --peers` is `edgephi bench …`."""
import sys

from edgephi.bench import main

if __name__ == "__main__":
    sys.exit(main())
