"""Our wkv7 CUDA kernel (kernels/wkv7) behind torch.library custom ops and an autograd Function.

Public API (used by rwkv7.wkv):
    available() -> bool     True only if CUDA is present and the kernel builds/loads and runs; never raises; cached.
    wkv7_cuda(r, w, k, v, a, b, state=None, return_state=False) -> y, or (y, final_state fp32 [B,H,64,64])
    normalise_arch_list_for_deepspeed()   rewrite TORCH_CUDA_ARCH_LIST '9.0a' -> '9.0' (call before importing deepspeed)

Inputs are [B, T, H, 64]; w is the raw decay logit. The kernel works in bf16: inputs of another dtype are cast to bf16
first (differentiably, so their gradients come back in their own dtype), and y is returned in r's dtype. T need not be
a multiple of 16 here: shorter tails are padded at the front with steps that leave the state unchanged.

Custom ops (opaque to torch.compile, with fake implementations):
    rwkv7::wkv7_forward(r, w, k, v, a, b, s0?, save) -> (y, ckpt, sa)
    rwkv7::wkv7_backward(r, w, k, v, a, b, dy, ckpt, sa, dsT?) -> (dr, dw, dk, dv, da, db, ds0)

Loading: an ahead-of-time build (kernels/build.py) in $RWKV7_KERNEL_DIR or kernels/build/ is used when its name (a hash
of the sources, flags, torch and CUDA versions) matches and its recorded arch list covers the GPU; otherwise the
kernel is compiled once (ninja) into $RWKV7_KERNEL_CACHE or ~/.cache/rwkv7/kernels and reused from there.
"""
import functools
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from rwkv7.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
KERNEL_SRC = REPO_ROOT / "kernels" / "wkv7"
SOURCES = ("wkv7.cu", "wkv7_op.cpp")
CUDA_FLAGS = ["-O3", "--use_fast_math", "-Xptxas", "-O3", "-lineinfo", "--resource-usage"]  # -std comes from cpp_extension
CXX_FLAGS = ["-O3"]
CHUNK = 16
# Thread layout codes (kernels/wkv7/wkv7.cu). Below 100, one code serves both directions: 2, 4, 8 = that many threads
# per state row; 24, 28, 48 = R rows (first digit) shared by LC threads (second digit). From 100 up, 100*S + 10*R + LC:
# kernels that stage through cp.async; the forward splits each (b, h) over S blocks of 64/S rows (211: one row per
# thread, 32 threads, two blocks per head). The backward's 1xx have S = 1; its 2xx (S = 2, R = 1, LC = 1/2/4 threads
# per key channel) split each (b, h) over a thread-block cluster of 2 blocks that add their key-channel partial sums
# through distributed shared memory once per chunk: they need compute capability 9.0+ (bwd_layout_supported).
# Codes + 1000 (forward split and backward cluster layouts) fold the decay into per-column scales within each chunk.
# Chosen from bench/wkv_kernel.py; RWKV7_WKV_LANES="fwd,bwd" overrides.
LAYOUTS = (2, 4, 8, 24, 28, 48)  # forward and backward
_SPLIT = (111, 128, 211, 222, 224, 228, 244, 412, 428)
FWD_LAYOUTS = LAYOUTS + _SPLIT + tuple(1000 + x for x in _SPLIT)
_CLUSTER = (211, 212, 214)
CLUSTER_BWD_LAYOUTS = _CLUSTER + tuple(1000 + x for x in _CLUSTER)  # thread-block clusters: sm_90+
BWD_LAYOUTS = LAYOUTS + (112, 114, 124, 128) + CLUSTER_BWD_LAYOUTS
FWD_LANES, BWD_LANES = 1228, 1212  # H200, 2026-11-27: fastest forward / backward (bench/wkv_kernel.py)
BWD_FALLBACK = 112  # fastest backward without thread-block clusters (GPUs before sm_90)


def parse_lanes(value: str) -> tuple[int, int]:
    """'fwd,bwd' (RWKV7_WKV_LANES) -> (fwd, bwd) layout codes, each checked against FWD_LAYOUTS / BWD_LAYOUTS."""
    try:
        fwd, bwd = (int(x) for x in value.split(","))
    except ValueError:
        fwd = bwd = None
    if fwd not in FWD_LAYOUTS or bwd not in BWD_LAYOUTS:
        raise UserError(f"RWKV7_WKV_LANES={value!r}: expected 'fwd,bwd' with fwd one of {FWD_LAYOUTS} and bwd one of "
                        f"{BWD_LAYOUTS}")
    return fwd, bwd


def bwd_layout_supported(code: int, capability: Optional[tuple[int, int]] = None) -> bool:
    """Whether backward layout `code` can run on a GPU of `capability` (default: the current one). The cluster
    layouts need 9.0+; on older GPUs their launch fails with 'operation not supported' instead of running."""
    if code not in CLUSTER_BWD_LAYOUTS:
        return code in BWD_LAYOUTS
    if capability is None:
        if not torch.cuda.is_available():
            return False
        capability = torch.cuda.get_device_capability()
    return tuple(capability) >= (9, 0)


@dataclass(frozen=True)
class LaneConfig:
    """The thread layouts the ops launch: the defaults, or RWKV7_WKV_LANES, read once (`lanes()`)."""

    fwd: int = FWD_LANES
    bwd: int = BWD_LANES

    @classmethod
    def from_env(cls, environ=os.environ) -> "LaneConfig":
        value = environ.get("RWKV7_WKV_LANES")
        return cls(*parse_lanes(value)) if value else cls()


@functools.cache
def lanes() -> LaneConfig:
    return LaneConfig.from_env()


_BWD_BY_DEVICE: dict = {}


def _bwd_lanes(device: torch.device) -> int:
    """The configured backward layout where this GPU can run it, else BWD_FALLBACK (cached per device)."""
    if device.index not in _BWD_BY_DEVICE:
        bwd = lanes().bwd
        ok = bwd_layout_supported(bwd, torch.cuda.get_device_capability(device))
        _BWD_BY_DEVICE[device.index] = bwd if ok else BWD_FALLBACK
    return _BWD_BY_DEVICE[device.index]

_state: dict = {"loaded": False, "available": None, "reason": None, "path": None}


def normalise_arch_list_for_deepspeed() -> None:
    """DeepSpeed's op builder cannot parse arch suffixes like '9.0a': rewrite them in os.environ ('9.0a' -> '9.0')."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value:
        return
    out = []
    for item in value.replace(";", " ").split():
        try:
            major, minor, _, ptx = parse_arch(item)
            entry = f"{major}.{minor}" + ("+PTX" if ptx else "")  # 9.0a / 10.0f -> 9.0 / 10.0
        except ValueError:
            entry = item  # not a number (a named arch): DeepSpeed's to judge
        if entry not in out:
            out.append(entry)
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(out)


def extension_name() -> str:
    """Name of the compiled library: changes whenever sources, flags, torch or CUDA change (stale builds never load)."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((KERNEL_SRC / name).read_bytes())
    h.update(json.dumps([CUDA_FLAGS, CXX_FLAGS, torch.__version__, torch.version.cuda]).encode())
    return "rwkv7_wkv7_" + h.hexdigest()[:12]


def aot_dir() -> Path:
    return Path(os.environ.get("RWKV7_KERNEL_DIR") or REPO_ROOT / "kernels" / "build")


def cache_dir() -> Path:
    return Path(os.environ.get("RWKV7_KERNEL_CACHE") or Path.home() / ".cache" / "rwkv7" / "kernels")


def parse_arch(item: str) -> tuple[int, int, str, bool]:
    """One TORCH_CUDA_ARCH_LIST entry: '9.0a+PTX' -> (9, 0, 'a', True); ValueError when it is not 'M.N...'."""
    ptx = item.endswith("+PTX")
    base = item[:-4] if ptx else item
    suffix = base[-1] if base[-1:] in ("a", "f") else ""
    major, minor = base[: len(base) - len(suffix)].split(".")
    return int(major), int(minor), suffix, ptx


def arch_covers(arch_list: str, capability: tuple[int, int]) -> bool:
    """Whether a build for `arch_list` runs on a GPU of `capability` (same-major SASS, exact 'a', or older PTX)."""
    major, minor = capability
    for m, n, suffix, ptx in (parse_arch(item) for item in arch_list.replace(";", " ").split()):
        tag = suffix or ("+PTX" if ptx else "")
        if tag == "+PTX" and (m, n) <= (major, minor):
            return True
        if tag in ("a", "f") and (m, n) == (major, minor):
            return True
        if tag == "" and m == major and n <= minor:
            return True
    return False


def check_toolchain() -> None:
    """Raise UserError naming what is missing to compile the kernel here."""
    if not torch.cuda.is_available():
        raise UserError("the wkv7 CUDA kernel needs a CUDA GPU and a CUDA build of PyTorch; none is visible "
                        "(use backend 'torch', or run on a GPU machine)")
    from torch.utils import cpp_extension

    nvcc = Path(cpp_extension.CUDA_HOME or "") / "bin" / "nvcc" if cpp_extension.CUDA_HOME else None
    if nvcc is None or not nvcc.exists():
        found = shutil.which("nvcc")
        if not found:
            raise UserError("nvcc not found: install the CUDA toolkit matching PyTorch's CUDA "
                            f"{torch.version.cuda} and set CUDA_HOME (or put nvcc on PATH), or copy a prebuilt "
                            "kernels/build/ (python kernels/build.py) and point RWKV7_KERNEL_DIR at it")
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary on PATH via its module)
        except ImportError:
            raise UserError("ninja not found: pip install ninja") from None
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        raise UserError(f"the wkv7 kernel needs a GPU of compute capability 8.0 or newer (bf16); this one is "
                        f"{cap[0]}.{cap[1]}; use backend 'torch'")


def build(directory: Path, verbose: bool = False, arch_list: Optional[str] = None) -> Path:
    """Compile the extension into `directory` (ninja, incremental), load it, and record the arch list it targets."""
    check_toolchain()
    from torch.utils import cpp_extension

    cap = torch.cuda.get_device_capability()
    arch = arch_list or os.environ.get("TORCH_CUDA_ARCH_LIST") or f"{cap[0]}.{cap[1]}"
    if not arch_covers(arch, cap):
        raise UserError(f"TORCH_CUDA_ARCH_LIST={arch!r} does not include this GPU (compute capability "
                        f"{cap[0]}.{cap[1]}): set it to '{cap[0]}.{cap[1]}' or add that entry")
    name = extension_name()
    directory = Path(directory) / name
    directory.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # cpp_extension turns this into -gencode flags
    try:
        cpp_extension.load(name=name, sources=[str(KERNEL_SRC / s) for s in SOURCES], extra_cflags=CXX_FLAGS,
                           extra_cuda_cflags=CUDA_FLAGS, build_directory=str(directory), is_python_module=False,
                           verbose=verbose)
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    (directory / "build.json").write_text(json.dumps({"name": name, "arch": arch, "torch": torch.__version__,
                                                      "cuda": torch.version.cuda}))
    _state.update(loaded=True, path=str(directory / f"{name}.so"))
    return directory / f"{name}.so"


def prebuilt_in(root: Path, name: str, cap: tuple[int, int]) -> Optional[Path]:
    """The library `name` built under `root` (kernels/build.py's layout) if its recorded arch list covers `cap`."""
    so, meta = root / name / f"{name}.so", root / name / "build.json"
    if so.exists() and meta.exists():
        try:
            if arch_covers(json.loads(meta.read_text())["arch"], cap):
                return so
        except (ValueError, KeyError, OSError):
            return None
    return None


def find_prebuilt(capability: tuple[int, int]) -> Optional[Path]:
    """The current sources' prebuilt library for a GPU of `capability`: the AOT dir first, then the JIT cache."""
    name = extension_name()
    return next((so for root in (aot_dir(), cache_dir()) if (so := prebuilt_in(root, name, capability))), None)


def unavailable_reason() -> Optional[str]:
    """Why available() said no (None before it was asked, or when it said yes)."""
    return _state["reason"]


def load() -> None:
    """Load the kernel library once: prebuilt (AOT dir, then cache), else JIT-compile into the cache."""
    if _state["loaded"]:
        return
    if not torch.cuda.is_available():
        check_toolchain()  # raises with the reason
    cap = torch.cuda.get_device_capability()
    so = find_prebuilt(cap)
    if so is not None:
        torch.ops.load_library(str(so))
        _state.update(loaded=True, path=str(so))
        return
    # JIT for exactly this GPU, so a mismatching TORCH_CUDA_ARCH_LIST cannot produce an unusable build
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or ""
    build(cache_dir(), arch_list=arch if arch and arch_covers(arch, cap) else f"{cap[0]}.{cap[1]}")


def available() -> bool:
    """True only if CUDA is present and the kernel loads and runs a tiny call. Never raises; the answer is cached."""
    if _state["available"] is not None:
        return _state["available"]
    ok, reason = False, None
    try:
        if not torch.cuda.is_available():
            reason = "no CUDA device"
        else:
            load()
            x = torch.randn(1, CHUNK, 1, 64, device="cuda").bfloat16()
            torch.ops.rwkv7.wkv7_forward(x, x, x, x, x, x, None, False)
            torch.cuda.synchronize()
            ok = True
    except Exception as exc:  # noqa: BLE001 - availability probe: any failure means "use the torch backend"
        reason = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"wkv7 CUDA kernel unavailable, falling back to torch: {reason}", stacklevel=2)
    _state.update(available=ok, reason=reason)
    return ok


def require() -> None:
    """Raise UserError (with what is missing and how to fix it) unless the kernel is usable."""
    if available():
        return
    if not torch.cuda.is_available():
        raise UserError("wkv7 backend 'cuda' needs a CUDA GPU; none is visible (use backend 'torch' or 'auto')")
    check_toolchain()
    raise UserError(f"wkv7 CUDA kernel failed to build or run: {_state['reason']} "
                    "(try: python kernels/build.py --verbose)")


# ------------------------------------------------------------------------------------------------ custom ops

@torch.library.custom_op("rwkv7::wkv7_forward", mutates_args=())
def wkv7_forward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, s0: Optional[torch.Tensor], save: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    load()
    return torch.ops.rwkv7_wkv7_ext.forward(r, w, k, v, a, b, s0, save, lanes().fwd)


@wkv7_forward.register_fake
def _(r, w, k, v, a, b, s0, save):
    B, T, H, N = r.shape
    f32 = dict(dtype=torch.float32, device=r.device)
    ckpt = torch.empty((B, H, T // CHUNK if save else 1, N, N), **f32)
    sa = torch.empty((B, T, H, N) if save else (0,), **f32)
    return torch.empty_like(r), ckpt, sa


@torch.library.custom_op("rwkv7::wkv7_backward", mutates_args=())
def wkv7_backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  b: torch.Tensor, dy: torch.Tensor, ckpt: torch.Tensor, sa: torch.Tensor,
                  dsT: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    load()
    return torch.ops.rwkv7_wkv7_ext.backward(r, w, k, v, a, b, dy, ckpt, sa, dsT, _bwd_lanes(dy.device))


@wkv7_backward.register_fake
def _(r, w, k, v, a, b, dy, ckpt, sa, dsT):
    B, T, H, N = r.shape
    grads = tuple(torch.empty_like(r) for _ in range(6))
    return (*grads, torch.empty((B, H, N, N), dtype=torch.float32, device=r.device))


class WKV7Function(torch.autograd.Function):
    """Autograd over the two ops; inputs bf16 contiguous [B,T,H,64] (T % 16 == 0), s0 fp32 or None.
    recompute: save only the inputs; the backward reruns the forward for the state checkpoints (rwkv7.wkv.wkv7)."""

    @staticmethod
    def forward(ctx, r, w, k, v, a, b, s0, recompute=False):
        y, ckpt, sa = torch.ops.rwkv7.wkv7_forward(r, w, k, v, a, b, s0, True)
        ctx.set_materialize_grads(False)  # an unused final state costs no zero-filled gradient
        final = ckpt[:, :, -1].clone()
        if recompute:
            ctx.save_for_backward(r, w, k, v, a, b, s0)
        else:
            ctx.save_for_backward(r, w, k, v, a, b, ckpt, sa)
        ctx.has_s0, ctx.recompute = s0 is not None, recompute
        return y, final

    @staticmethod
    def backward(ctx, dy, dsT):
        if ctx.recompute:
            r, w, k, v, a, b, s0 = ctx.saved_tensors
            _, ckpt, sa = torch.ops.rwkv7.wkv7_forward(r, w, k, v, a, b, s0, True)
        else:
            r, w, k, v, a, b, ckpt, sa = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.to(torch.bfloat16).contiguous()
        dsT = None if dsT is None else dsT.float().contiguous()
        dr, dw, dk, dv, da, db, ds0 = torch.ops.rwkv7.wkv7_backward(r, w, k, v, a, b, dy, ckpt, sa, dsT)
        return dr, dw, dk, dv, da, db, (ds0 if ctx.has_s0 else None), None


def wkv7_cuda(r, w, k, v, a, b, state=None, return_state=False, recompute=False):
    """The wkv7 recurrence on our kernel: y in r's dtype, or (y, final_state fp32 [B,H,64,64]) with return_state."""
    require()
    B, T, H, N = r.shape
    if N != 64:
        raise UserError(f"the wkv7 CUDA kernel supports head size 64 only, got {N} (use backend 'torch')")
    out_dtype = r.dtype
    s0 = None if state is None else state.float().contiguous()
    if T == 0:
        y = r.new_zeros(B, 0, H, N)
        final = s0 if s0 is not None else r.new_zeros(B, H, N, N, dtype=torch.float32)
        return (y, final) if return_state else y
    xs = [t.to(torch.bfloat16).contiguous() for t in (r, w, k, v, a, b)]
    pad = (-T) % CHUNK
    if pad:
        # front padding: zero inputs and decay exactly 1 (logit -1e4) leave the initial state untouched
        xs = [torch.cat([x.new_full((B, pad, H, N), -1e4 if idx == 1 else 0.0), x], dim=1)
              for idx, x in enumerate(xs)]
    needs_grad = torch.is_grad_enabled() and (any(t.requires_grad for t in (r, w, k, v, a, b))
                                              or (s0 is not None and s0.requires_grad))
    if needs_grad:
        y, final = WKV7Function.apply(*xs, s0, recompute)
    else:
        y, ckpt, _ = torch.ops.rwkv7.wkv7_forward(*xs, s0, False)
        final = ckpt[:, :, 0]
    if pad:
        y = y[:, pad:]
    y = y.to(out_dtype)
    return (y, final) if return_state else y
