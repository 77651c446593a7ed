"""Recipes are data: recipes/<name>.toml → a typed, validated Recipe.

Sections: [model] the architecture, [data] where tokens come from, [train] optimiser/schedule/hardware, [check] the
expected log and its tolerance. Unknown sections or keys are errors; `--set section.key=value` overrides any key with
a value parsed to that key's type. Every check here runs before data is read or a model is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rwkv7.errors import UserError
from rwkv7.strategy import Strategy

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
MIN_CHUNKS = 228  # below 228 ctx chunks some sizes have no magic prime within the official 0.9 ratio
MINI_EPOCH_SAMPLES = 40320  # official: a mini-epoch is always 40320 samples (= 8!), docs/ALIGNMENT.md


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_embd: int = 768
    vocab_size: int = 65536
    head_size: int = 64


@dataclass
class DataConfig:
    source: str = "binidx"       # binidx (a local prefix) | hub (huggingface_hub download) | synthetic (generated)
    path: str = ""               # binidx prefix (binidx), or where to write the generated corpus (synthetic)
    hub_repo: str = ""           # hub: dataset repo id
    hub_files: list = field(default_factory=list)  # hub: [idx path, bin path] inside the repo
    hub_revision: str = ""
    sha256: dict = field(default_factory=dict)     # file name → expected sha256 (optional)
    data_dir: str = "data"       # hub: local folder for downloads (relative to the working directory)
    val_path: str = ""           # optional held-out binidx prefix, reported as validation loss
    val_tokens: int = 262144     # validation tokens per mini-epoch (0: the whole split)
    magic_prime: int = 0         # 0: computed from the data size and ctx_len
    my_exit_tokens: int = 0      # 0: the data's token count (the official demo passes exactly that)
    synthetic_tokens: int = 400_000
    synthetic_seed: int = 0


@dataclass
class TrainConfig:
    ctx_len: int = 512
    micro_bsz: int = 16
    lr_init: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 10
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-18
    weight_decay: float = 0.001
    grad_clip: float = 1.0
    grad_cp: int = 1
    epoch_save: int = 10
    epoch_count: int = 0         # mini-epochs to train in total; 0: until my_exit_tokens, as the official trainer
    epoch_steps: int = 0         # steps per mini-epoch; 0: the official 40320 // real_bsz
    precision: str = "bf16"      # bf16 (DeepSpeed, GPU) | fp32
    strategy: Strategy = Strategy.DEEPSPEED_STAGE_2  # rwkv7/strategy.py; auto is resolved by resolve_strategy
    accelerator: str = "gpu"     # gpu | cpu
    devices: int = 1
    num_nodes: int = 1
    ds_bucket_mb: int = 200
    dist_timeout_min: int = 30    # a collective that waits longer (a hung or dead rank) ends the job
    seed: int = 0
    init_bf16_round: bool = True  # the official rwkv-init.pth is saved in bf16, so training starts from bf16 values
    keep_checkpoints: int = 2
    max_bad_steps: int = 0        # non-finite losses tolerated (skipped) before the run stops
    num_workers: int = 1
    compile: bool = True          # GPU: torch.compile the blocks into fused kernels (about 30 s at start); CPU: eager
    recompute: str = "selective"  # grad_cp on compiled blocks: selective (keep matmul outputs) | full (least memory)
    cuda_graph: bool = True       # strategy single: replay forward+backward as one CUDA graph (no effect elsewhere)
    cpu_threads: int = 0          # torch threads on CPU runs; 0: torch's default. 1 makes CPU logs bit-reproducible

    def __post_init__(self):
        self.strategy = Strategy.parse(self.strategy)

    @property
    def gpus(self) -> int:
        return self.devices * self.num_nodes


@dataclass
class CheckConfig:
    expected: str = ""           # path relative to recipes/ (or absolute); empty: no check
    tolerance: float = 0.02      # absolute, per mini-epoch
    rel_tolerance: float = 0.0
    max_outliers: int = 0


@dataclass
class Recipe:
    name: str
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    check: CheckConfig = field(default_factory=CheckConfig)

    @property
    def real_bsz(self) -> int:
        return self.train.micro_bsz * self.train.devices * self.train.num_nodes

    @property
    def epoch_steps(self) -> int:
        return self.train.epoch_steps or MINI_EPOCH_SAMPLES // self.real_bsz

    @property
    def tokens_per_step(self) -> int:
        return self.real_bsz * self.train.ctx_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the numbers a run produces: not its length or saving, and not how the
        global batch is split over GPUs and nodes (the sampler gives every step the same samples either way). The
        recipe's name and data folder count too, though a copy elsewhere may hold the same: resuming across them
        takes --force-resume, a deliberate step rather than a silent mix of two runs."""
        d = self.to_dict()
        for k in ("epoch_count", "epoch_save", "keep_checkpoints", "num_workers", "max_bad_steps",
                  "dist_timeout_min", "micro_bsz", "devices", "num_nodes", "cuda_graph", "compile",
                  "recompute"):  # the last three: how the step runs, the same arithmetic
            d["train"].pop(k)
        d["train"]["real_bsz"] = self.real_bsz  # how a global batch is split over ranks does not change the numbers
        if d["train"]["strategy"] == "ddp":  # single's arithmetic on N ranks: one run may move between the two
            d["train"]["strategy"] = "single"
        d.pop("check")
        d.pop("description")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def expected_log(self) -> Path | None:
        if not self.check.expected:
            return None
        p = Path(self.check.expected)
        return p if p.is_absolute() else RECIPES_DIR / p


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "check": CheckConfig}


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def _exact(name: str, value: Any, typ: type) -> Any:
    """A value from a TOML file must already have the key's type (an int is fine where a float is meant)."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is typ:
        return value
    hint = ": write it without quotes" if isinstance(value, str) and typ in (int, float, bool) else ""
    raise UserError(f"{name} must be a {typ.__name__}, got {value!r} (a {type(value).__name__}){hint}")


def _coerce(section: str, key: str, value: Any, typ: Any, exact: bool = False) -> Any:
    name = f"{section}.{key}"
    typ = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(typ, typ)
    if typ == "Strategy":
        return Strategy.parse(value)
    if exact:
        return _exact(name, value, typ)
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            try:
                return int(value)  # exact, however large (float() would round past 2^53)
            except ValueError:
                pass
            try:
                as_float = float(value)  # 1e9, 4.0
                if as_float.is_integer():
                    return int(as_float)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ in (list, dict):
        if isinstance(value, typ):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
                if isinstance(parsed, typ):
                    return parsed
            except json.JSONDecodeError:
                pass
    raise UserError(f"{name} must be a {typ.__name__}, got {value!r}")


def _apply(recipe: Recipe, section: str, key: str, value: Any, origin: str, exact: bool = False) -> None:
    if section not in SECTIONS:
        raise UserError(f"{origin}: unknown section [{section}]; sections are {', '.join(SECTIONS)}")
    obj = getattr(recipe, section)
    known = {f.name: f.type for f in fields(obj)}
    if key not in known:
        raise UserError(f"{origin}: unknown key {section}.{key}; valid keys: {', '.join(sorted(known))}")
    setattr(obj, key, _coerce(section, key, value, known[key], exact))


def parse_override(text: str) -> tuple[str, str, str]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(f"--set {text!r}: write it as section.key=value, e.g. --set train.micro_bsz=8")
    lhs, value = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    return section, key, value.strip()


def load_recipe(name_or_path: str, overrides: list[str] | tuple = ()) -> Recipe:
    """Load a named recipe (recipes/<name>.toml) or a .toml path, apply `section.key=value` overrides, validate."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        path = RECIPES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"unknown recipe {name_or_path!r}: choose one of {', '.join(available())} "
                        "(`rwkv7 recipes` lists them) or give a path to a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read recipe {path} ({e.strerror or e}): make it readable (chmod +r)") from None
    recipe = Recipe(name=path.stem, description=str(raw.pop("description", "")))
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise UserError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            _apply(recipe, section, key, value, str(path), exact=True)
    overridden = set()
    for text in overrides:
        section, key, value = parse_override(text)
        _apply(recipe, section, key, value, f"--set {text}")
        overridden.add(f"{section}.{key}")
    if "data.path" in overridden and "data.source" not in overridden and recipe.data.source == "hub":
        recipe.data.source = "binidx"  # `--set data.path=PREFIX` means: train on this local data instead
    resolve_strategy(recipe.train)
    validate(recipe)
    return recipe


def resolve_strategy(t: "TrainConfig") -> None:
    """strategy auto on GPUs becomes a concrete strategy (Strategy.resolved_for)."""
    t.strategy = t.strategy.resolved_for(t.accelerator, t.gpus, t.precision)


# upper bounds that keep sizes inside what torch and the sampler can index (and a typo from filling the machine)
LIMITS = {"model.n_layer": 4096, "model.n_embd": 1 << 16, "model.head_size": 4096,
          "train.ctx_len": 1 << 20, "train.micro_bsz": 1 << 16, "train.devices": 4096, "train.num_nodes": 4096,
          "data.synthetic_tokens": 1 << 31, "train.ds_bucket_mb": 1 << 20, "train.dist_timeout_min": 100_000}
INT64 = 1 << 63


def _check_numbers(r: Recipe) -> None:
    """Every number finite and inside int64 (or its own limit); seeds and thread counts in range."""
    import math
    import os

    for section in SECTIONS:
        for f in fields(getattr(r, section)):
            name, v = f"{section}.{f.name}", getattr(getattr(r, section), f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -INT64 <= v < INT64:
                raise UserError(f"{name} = {v} is out of range (at least {-INT64}, at most {INT64 - 1})")
            if name in LIMITS and isinstance(v, int) and v > LIMITS[name]:
                raise UserError(f"{name} = {v} is too large (at most {LIMITS[name]})")
    t, d = r.train, r.data
    for name, seed in (("train.seed", t.seed), ("data.synthetic_seed", d.synthetic_seed)):
        if not 0 <= seed < 1 << 32:
            raise UserError(f"{name} must be in [0, 2^32), got {seed}")
    cpus = os.cpu_count() or 1
    for name, n in (("train.cpu_threads", t.cpu_threads), ("train.num_workers", t.num_workers)):
        if n > max(4 * cpus, 64):  # far past this machine's cores: torch/OpenMP crash or the host stalls
            raise UserError(f"{name} = {n} is far more than the {cpus} CPUs here (more than {max(4 * cpus, 64)} "
                            f"is refused): use at most {cpus}")
    if t.warmup_steps < 0 or d.val_tokens < 0 or d.synthetic_tokens < 0:
        raise UserError("train.warmup_steps, data.val_tokens and data.synthetic_tokens must be >= 0")
    if r.model.vocab_size < 2:
        raise UserError(f"model.vocab_size must be >= 2 (token 0 ends a document), got {r.model.vocab_size}")


def validate(r: Recipe) -> None:
    _check_numbers(r)
    validate_ranges(r)
    validate_model(r)
    validate_train(r)
    validate_data(r)


def validate_ranges(r: Recipe) -> None:
    m, d, t, c = r.model, r.data, r.train, r.check
    positive = {"model.n_layer": m.n_layer, "model.n_embd": m.n_embd, "model.vocab_size": m.vocab_size,
                "model.head_size": m.head_size, "train.ctx_len": t.ctx_len, "train.micro_bsz": t.micro_bsz,
                "train.devices": t.devices, "train.num_nodes": t.num_nodes, "train.epoch_save": t.epoch_save,
                "train.lr_init": t.lr_init, "train.adam_eps": t.adam_eps, "train.keep_checkpoints": t.keep_checkpoints,
                "train.dist_timeout_min": t.dist_timeout_min, "train.ds_bucket_mb": t.ds_bucket_mb}
    for name, value in positive.items():
        if not value > 0:
            raise UserError(f"{name} must be > 0, got {value}")
    nonneg = {"train.lr_final": t.lr_final, "train.weight_decay": t.weight_decay, "train.grad_clip": t.grad_clip,
              "train.epoch_count": t.epoch_count, "train.epoch_steps": t.epoch_steps,
              "train.max_bad_steps": t.max_bad_steps, "data.magic_prime": d.magic_prime,
              "data.my_exit_tokens": d.my_exit_tokens, "check.tolerance": c.tolerance,
              "check.rel_tolerance": c.rel_tolerance, "check.max_outliers": c.max_outliers,
              "train.num_workers": t.num_workers, "train.cpu_threads": t.cpu_threads}
    for name, value in nonneg.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")


def validate_model(r: Recipe) -> None:
    m, d = r.model, r.data
    if m.n_embd % m.head_size:
        raise UserError(f"model.n_embd ({m.n_embd}) must be a multiple of model.head_size ({m.head_size})")
    if m.n_embd % 32:
        raise UserError(f"model.n_embd ({m.n_embd}) must be a multiple of 32 (the official LoRA ranks assume it)")
    if m.n_layer < 2:
        raise UserError("model.n_layer must be >= 2 (the official init divides by n_layer - 1)")
    if m.vocab_size > 65536:  # binidx data (official, prepared and generated) is uint16
        raise UserError(f"model.vocab_size {m.vocab_size} > 65536 cannot be stored in uint16 binidx data")


def validate_train(r: Recipe) -> None:
    t = r.train
    if t.grad_cp not in (0, 1):
        raise UserError(f"train.grad_cp must be 0 (keep activations) or 1 (recompute them), got {t.grad_cp}")
    if t.lr_final > t.lr_init:
        raise UserError(f"train.lr_final ({t.lr_final}) must be <= train.lr_init ({t.lr_init})")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise UserError(f"train.beta1/beta2 must lie in [0, 1), got {t.beta1}/{t.beta2}")
    if t.precision not in ("bf16", "fp32"):
        raise UserError(f"train.precision must be bf16 or fp32, got {t.precision!r}")
    if t.accelerator not in ("gpu", "cpu"):
        raise UserError(f"train.accelerator must be gpu or cpu, got {t.accelerator!r}")
    if t.recompute not in ("full", "selective"):
        raise UserError(f"train.recompute {t.recompute!r} unknown; choose full (least memory) or selective (keeps "
                        "the matmul outputs: faster, more memory)")
    if t.accelerator == "cpu" and (t.precision != "fp32" or t.strategy.gpu_only):
        raise UserError("a CPU run needs train.precision=fp32 and train.strategy=auto or ddp (DeepSpeed and bf16 "
                        "training are GPU paths; train.devices=N on a CPU runs N processes over gloo)")
    if t.strategy.unsupported:
        raise UserError(f"train.strategy={t.strategy} is not supported yet ({t.strategy.unsupported}); use "
                        "deepspeed_stage_2 or deepspeed_stage_2_offload")
    if t.max_bad_steps and t.devices * t.num_nodes > 1:
        raise UserError("train.max_bad_steps > 0 (skipping bad steps) needs a single process: with several ranks a "
                        "bad step stops the run (the last good checkpoint is kept)")
    if t.strategy.one_gpu and (t.accelerator != "gpu" or t.gpus != 1):
        raise UserError("train.strategy=single is one GPU (pure bf16 + fp32 master weights); use "
                        "ddp (the same step, data parallel) for several GPUs")
    if t.accelerator == "gpu" and t.ctx_len % 16:
        raise UserError(f"train.ctx_len ({t.ctx_len}) must be a multiple of 16 for the CUDA wkv7 kernel")
    if not t.epoch_steps and MINI_EPOCH_SAMPLES % r.real_bsz:
        raise UserError(f"micro_bsz x devices x num_nodes = {r.real_bsz} must divide {MINI_EPOCH_SAMPLES} "
                        "(the official mini-epoch size), or set train.epoch_steps explicitly")


def validate_data(r: Recipe) -> None:
    d, t = r.data, r.train
    if d.magic_prime:
        from rwkv7.data.magic import is_prime

        if not is_prime(d.magic_prime) or d.magic_prime % 3 != 2:
            raise UserError(f"data.magic_prime {d.magic_prime} must be a prime with p % 3 == 2; leave it 0 to "
                            "compute it from the data")
    if d.source not in ("binidx", "hub", "synthetic"):
        raise UserError(f"data.source must be binidx, hub or synthetic, got {d.source!r}")
    if d.source == "hub" and (not d.hub_repo or len(d.hub_files) != 2):
        raise UserError("data.source=hub needs data.hub_repo and data.hub_files = [idx path, bin path]")
    if d.source == "synthetic" and d.synthetic_tokens < MIN_CHUNKS * t.ctx_len:
        raise UserError(f"data.synthetic_tokens ({d.synthetic_tokens}) must be at least {MIN_CHUNKS} x ctx_len")
