#!/usr/bin/env python3
"""Container and checkout entry point: the same CLI as the `rwkv7` console script."""
import sys

if __name__ == "__main__":
    try:  # a Ctrl-C even while Python imports our code ends with 130 and one line, no traceback
        import os
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from rwkv7 import signals  # light: installs the SIGINT/SIGTERM handlers before anything heavy loads

        signals.install()
        from rwkv7.cli import main

        _kdir = os.environ.get("RWKV7_KERNEL_DIR") or Path(__file__).resolve().parent / "kernels" / "build"
        _skipped = Path(_kdir) / "KERNEL_SKIPPED"
        if _skipped.exists():  # container built with SKIP_KERNEL=1 (docs/CONTAINER.md)
            print(f"warning: {_skipped.read_text().strip()}; a GPU run JIT-builds it on first use", file=sys.stderr)
        code = main()
    except KeyboardInterrupt:  # before our handlers were installed
        print("interrupted (SIGINT): run the same command to start again", file=sys.stderr)
        code = 130
    sys.exit(code)
