"""docs_deepspeed.py (docs/recipes/deepspeed.md) with the ZeRO stage given as its argument."""

import sys

from tests._scripts import docs_deepspeed

if __name__ == "__main__":
    docs_deepspeed.CONFIG["zero_optimization"] = {"stage": int(sys.argv[1])}
    docs_deepspeed.main()
