"""Command-line pieces more than one command uses: the --recipe/--set arguments, --model/--device/--dtype."""
from __future__ import annotations

from pathlib import Path

from rwkv7.errors import UserError


def add_recipe_args(p) -> None:
    p.add_argument("--recipe", default="tiny", help="recipe name (see `rwkv7 recipes`) or a .toml path [tiny]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   nargs="+", help="override a recipe value, e.g. --set train.micro_bsz=8 (repeatable)")


def recipe_parser(sub, name: str, help: str, description: str, out_help: str | None = None):
    """A command parser with the shared --recipe/--set arguments (and --out when out_help is given)."""
    p = sub.add_parser(name, help=help, description=description)
    add_recipe_args(p)
    if out_help:
        p.add_argument("--out", help=out_help)
    return p


def overrides(args) -> list[str]:
    return [o for group in args.overrides for o in group]



def resolve_device(name: str, dtype_name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible to torch: use --device cpu")
    if dtype_name == "auto":
        dtype_name = "bf16" if name == "cuda" else "fp32"
    return torch.device(name), {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]


def model_path(arg: str) -> Path:
    """The weights file; like the rwkv package, a path without its .pth suffix is accepted."""
    p = Path(arg)
    if not p.is_file() and not arg.endswith(".pth") and Path(arg + ".pth").is_file():
        return Path(arg + ".pth")
    if not p.is_file():
        raise UserError(f"model file {p} not found: give an rwkv-*.pth written by `rwkv7 train`")
    return p


def open_model(arg: str, device_name: str = "auto", dtype_name: str = "auto"):
    """--model/--device/--dtype -> (model, path), for generate and eval."""
    from rwkv7.checkpoint import load_weights

    path = model_path(arg)
    device, dtype = resolve_device(device_name, dtype_name)
    return load_weights(path, device=device, dtype=dtype), path
