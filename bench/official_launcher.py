"""Runs pieces of the official RWKV-LM trainer (RWKV-v7/train_temp) unchanged, for bench/vs_official.py.

Always started with the official folder as the working directory (its train.py imports `src.*` and its
src/model.py compiles `cuda/*` by relative path). The official files are never edited: behaviour is added by
wrapping functions from the outside.

    python official_launcher.py extensions --json PATH [--kernel @rwkv3] [--head-chunk 0] [--head-size 64]
        import src/model.py with the CUDA builds recorded instead of run: PATH gets the load() arguments of every
        extension it would JIT-build (names, sources, flags), so they can be built beforehand, in parallel.
    python official_launcher.py build --spec JSON      build one recorded extension (torch cpp_extension.load)
    python official_launcher.py build --fused-adam     build DeepSpeed's FusedAdam, which the official optimizer JITs
    python official_launcher.py train --record PATH --steps N -- TRAIN.PY ARGUMENTS...
        run train.py with these arguments; after each step record (step, loss, wall time, peak memory), and after N
        steps write PATH (JSON) and end the process.
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
import time

T_START = time.time()


def official_env(kernel: str, head_chunk: int, head_size: int, ctx_len: int = 512, precision: str = "bf16") -> dict:
    """The environment train.py sets before it imports src/model.py (which reads it at import time)."""
    return {"RWKV_MY_TESTING": "x070", "RWKV_KERNEL": kernel, "RWKV_CTXLEN": str(ctx_len),
            "RWKV_HEAD_SIZE": str(head_size), "RWKV_HEAD_L2WRAP_CE_CHUNK": str(head_chunk),
            "RWKV_FLOAT_MODE": precision, "RWKV_JIT_ON": "1"}


def record_extensions(kernel: str, head_chunk: int, head_size: int) -> list[dict]:
    """Import the official model module with cpp_extension.load recording its arguments instead of compiling.
    Without the compiled ops, the two import-time uses of them are skipped too: registering autograd formulas for
    the ops, and TorchScript-compiling wrappers that call them."""
    import torch
    import torch.utils.cpp_extension as cpp_extension

    os.environ.update(official_env(kernel, head_chunk, head_size))
    calls: list[dict] = []
    saved = cpp_extension.load, torch.library.register_autograd, torch.jit.script
    cpp_extension.load = lambda *args, **kwargs: calls.append(_load_kwargs(args, kwargs))
    torch.library.register_autograd = lambda *args, **kwargs: None
    torch.jit.script = lambda fn, *args, **kwargs: fn
    try:
        import src.model  # noqa: F401  (the official module: its import is what we record)
    finally:
        cpp_extension.load, torch.library.register_autograd, torch.jit.script = saved
    return calls


def _load_kwargs(args: tuple, kwargs: dict) -> dict:
    if args:  # load(name, sources, ...) positionally
        kwargs = {**dict(zip(("name", "sources"), args)), **kwargs}
    return {k: v for k, v in kwargs.items() if k != "verbose"}


def build(spec: dict | None) -> None:
    """Compile one extension into TORCH_EXTENSIONS_DIR exactly as the official import will ask for it, so that the
    import later finds it built (same name, sources and flags: ninja has nothing left to do)."""
    if spec is None:
        from deepspeed.ops.op_builder import FusedAdamBuilder

        FusedAdamBuilder().load()
        return
    from torch.utils.cpp_extension import load

    load(**spec, verbose=False)


def run_train(record: str, steps: int, train_args: list[str]) -> None:
    """train.py under a wrapped per-step callback: the official code runs as it is, we only watch and stop it."""
    import torch
    import src.trainer as official_trainer

    rows: list[dict] = []
    original = official_trainer.train_callback.on_train_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        original(self, trainer, pl_module, outputs, batch, batch_idx)  # its loss .item() waits for the step
        if not trainer.is_global_zero:
            return
        rows.append({"step": len(rows) + 1, "loss": float(trainer.my_loss), "lr": float(trainer.my_lr),
                     "time": time.time(), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30})
        if len(rows) >= steps:
            write_json(record, {"process_start": T_START, "args": train_args, "rows": rows})
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # the official trainer never stops by itself before its exit tokens

    official_trainer.train_callback.on_train_batch_end = on_train_batch_end
    sys.argv = ["train.py", *train_args]
    runpy.run_path("train.py", run_name="__main__")
    raise SystemExit(f"train.py returned after {len(rows)} of {steps} steps")


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extensions")
    e.add_argument("--json", required=True)
    e.add_argument("--kernel", default="@rwkv3")
    e.add_argument("--head-chunk", type=int, default=0)
    e.add_argument("--head-size", type=int, default=64)
    b = sub.add_parser("build")
    g = b.add_mutually_exclusive_group(required=True)
    g.add_argument("--spec", help="one entry of the extensions JSON")
    g.add_argument("--fused-adam", action="store_true")
    t = sub.add_parser("train")
    t.add_argument("--record", required=True)
    t.add_argument("--steps", type=int, required=True)
    t.add_argument("train_args", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if not os.path.isfile("src/model.py") or not os.path.isfile("train.py"):
        print(f"error: {os.getcwd()} is not RWKV-LM's RWKV-v7/train_temp (no train.py, src/model.py): "
              "start the launcher from that folder", file=sys.stderr)
        return 2
    sys.path.insert(0, os.getcwd())
    if args.cmd == "extensions":
        write_json(args.json, record_extensions(args.kernel, args.head_chunk, args.head_size))
    elif args.cmd == "build":
        build(None if args.fused_adam else json.loads(args.spec))
    else:
        rest = args.train_args
        run_train(args.record, args.steps, rest[1:] if rest[:1] == ["--"] else rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
