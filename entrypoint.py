#!/usr/bin/env python3
"""Container and checkout entry point: the same CLI as the `rwkv7` console script."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rwkv7.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
