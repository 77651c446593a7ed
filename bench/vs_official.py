"""The official RWKV-LM trainer and ours, one after the other on the same GPU, from the same official initial weights
(issue 13 acceptance): tokens/s, ratio, peak memory and the loss-trajectory comparison.

    python bench/vs_official.py --official ref/RWKV-LM/RWKV-v7/train_temp --data PREFIX \\
        [--shapes 0.1b,0.4b,1.5b] [--steps 400] [--short-steps 40] [--ours-set SECTION.KEY=VALUE[,...]]... \\
        [--out DIR] [--work DIR] [--skip-build | --build-only] [--dry-run]

--official is a git-ignored copy of RWKV-LM's RWKV-v7/train_temp (never committed). Its files are run unchanged
through bench/official_launcher.py. Needs pytorch-lightning 1.9.5 and deepspeed importable, nvcc and ninja.

1. Build (unless --skip-build): the official CUDA extensions (recorded from an import of its src/model.py) and
   DeepSpeed's FusedAdam, each in its own process, in parallel, into TORCH_EXTENSIONS_DIR, with our wkv7 kernel
   (kernels/build.py) beside them. The official import then finds them built.
2. Official stage 1 for every shape, in parallel: train.py --train_stage 1 --random_seed 42 writes rwkv-init.pth.
3. Per shape: official stage 3 (DeepSpeed stage 2, --kernel @rwkv3) for N steps from that file, then ours
   (`entrypoint.py train --recipe 0.1b-short --load-model rwkv-init.pth`, strategy auto = our default path on one
   GPU), then once more per --ours-set with those extra `--set` overrides (a variant, e.g. train.compile=1).
   N = --steps for 0.1b, --short-steps for the larger shapes.
Both sides: ctx 512, micro_bsz 16, grad_cp 1, bf16, magic_prime 18671, my_exit_tokens 1,498,226,207, lr 6e-4 ->
6e-5, warmup 10, betas (0.9, 0.99), eps 1e-18, weight decay 0.001.

Step time = the median of per-step wall-clock differences over the steady steps (after the first min(20, N/3)), the
same definition on both sides (official: time at its per-step callback, which waits for the loss; ours: the `time`
of metrics.jsonl rows, read back one step late). tokens/s = 8192 / step time. Peak = torch.cuda.max_memory_allocated.
MFU: our metrics' FLOPs per token (rows' mfu / tokens_per_s) at each side's tokens/s.
Trajectory: per-step |loss difference| and the 50-step window means of each side (limit 0.015 per window).

Writes vs_official.json into --out (default $OUT, else /tmp/vs-official) after every run, so an interrupted call
still leaves what was measured; weights, run folders and full logs stay in --work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train_runs import ROOT, metric_rows, throughput, train, train_command

SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048)}
CTX_LEN, MICRO_BSZ = 512, 16
TOKENS_PER_STEP = CTX_LEN * MICRO_BSZ
MAGIC_PRIME, EXIT_TOKENS = 18671, 1498226207
KERNEL, HEAD_CHUNK, HEAD_SIZE = "@rwkv3", 0, 64
WINDOW, WINDOW_LIMIT = 50, 0.015
LAUNCHER = Path(__file__).resolve().with_name("official_launcher.py")
T0 = time.time()


class BadInput(Exception):
    pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:5.0f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- the maths

def warmup_steps(n: int) -> int:
    """Steps left out of the timing: the first 20, or the first third of a short run."""
    return min(20, n // 3)


def step_durations(times: list[float], skip: int, drop_last: bool = False) -> list[float]:
    """Wall seconds of steps skip+1..n (1-based) from the times at which each step was seen done. drop_last: the
    last time is not a steady one (ours reads its last two rows back together when the run ends)."""
    if drop_last:
        times = times[:-1]
    start = max(skip, 1)  # step 1 has no predecessor
    return [times[i] - times[i - 1] for i in range(start, len(times))]


def timing(rows: list[dict], drop_last: bool = False, tokens_per_step: int = TOKENS_PER_STEP) -> dict:
    """Median step time over the steady steps, tokens/s from it, and peak memory over the whole run."""
    durations = step_durations([r["time"] for r in rows], warmup_steps(len(rows)), drop_last)
    if not durations:
        raise ValueError(f"{len(rows)} steps are too few to time")
    step_s = statistics.median(durations)
    return {"steps": len(rows), "timed_steps": len(durations), "step_ms": round(1000 * step_s, 2),
            "mean_step_ms": round(1000 * statistics.fmean(durations), 2),
            "tokens_per_s": round(tokens_per_step / step_s),
            "peak_mem_gib": round(max(r.get("peak_mem_gib", 0.0) for r in rows), 3),
            "peak_reserved_gib": round(max(r.get("peak_reserved_gib", 0.0) for r in rows), 3)}


def mfu_per_token_s(rows: list[dict]) -> float | None:
    """Our metrics' MFU per (token/s): FLOPs per token / peak FLOP/s of the card, the same for both sides."""
    ratios = [r["mfu"] / r["tokens_per_s"] for r in rows if r.get("mfu") and r.get("tokens_per_s")]
    return statistics.median(ratios) if ratios else None


def window_means(losses: list[float], window: int = WINDOW) -> list[float]:
    """Means of consecutive full windows (steps 1-50, 51-100, ...); a partial last window is left out."""
    return [statistics.fmean(losses[i:i + window]) for i in range(0, len(losses) - window + 1, window)]


def trajectory(official: list[float], ours: list[float], window: int = WINDOW, limit: float = WINDOW_LIMIT) -> dict:
    """Per-step and per-window loss differences over the steps both sides ran."""
    n = min(len(official), len(ours))
    a, b = official[:n], ours[:n]
    deltas = [abs(x - y) for x, y in zip(a, b)]
    finite = [d for d in deltas if math.isfinite(d)]
    wa, wb = window_means(a, window), window_means(b, window)
    wd = [abs(x - y) for x, y in zip(wa, wb)]
    worst = max(range(n), key=lambda i: deltas[i] if math.isfinite(deltas[i]) else -1.0) if finite else None
    first = next((i + 1 for i, d in enumerate(deltas) if d != 0), None)
    out = {"steps": n, "non_finite_steps": n - len(finite),
           "max_abs_delta": max(finite) if finite else None, "at_step": None if worst is None else worst + 1,
           "mean_abs_delta": statistics.fmean(finite) if finite else None, "first_differing_step": first,
           "window": window, "official_window_means": wa, "ours_window_means": wb, "window_abs_deltas": wd,
           "max_window_delta": max(wd) if wd else None, "limit": limit}
    out["within_limit"] = (bool(wd) and all(math.isfinite(d) for d in wd) and max(wd) <= limit) if wd else None
    return out


def ratio(ours: dict, official: dict) -> float | None:
    if not ours.get("tokens_per_s") or not official.get("tokens_per_s"):
        return None
    return round(ours["tokens_per_s"] / official["tokens_per_s"], 3)


# ---------------------------------------------------------------------------------------------------- commands

def official_args(shape: str, data: str, proj_dir: Path, stage: int) -> list[str]:
    """train.py arguments of the official demo (demo-training-run.sh) at this shape, on our data order."""
    n_layer, n_embd = SHAPES[shape]
    common = ["--my_testing", "x070", "--n_layer", str(n_layer), "--n_embd", str(n_embd), "--vocab_size", "65536",
              "--ctx_len", str(CTX_LEN), "--head_size", str(HEAD_SIZE), "--data_file", data, "--data_type", "binidx",
              "--magic_prime", str(MAGIC_PRIME), "--my_exit_tokens", str(EXIT_TOKENS),
              "--lr_init", "6e-4", "--lr_final", "6e-5", "--warmup_steps", "10", "--beta1", "0.9", "--beta2", "0.99",
              "--adam_eps", "1e-18", "--weight_decay", "0.001", "--kernel", KERNEL, "--head_chunk", str(HEAD_CHUNK),
              "--precision", "bf16", "--strategy", "deepspeed_stage_2", "--grad_cp", "1", "--devices", "1",
              "--proj_dir", str(proj_dir)]
    if stage == 1:  # builds rwkv-init.pth on the CPU and exits (the extensions still load at import: needs the GPU)
        return common + ["--train_stage", "1", "--random_seed", "42", "--micro_bsz", "1", "--accelerator", "cpu"]
    return common + ["--load_model", "0", "--train_stage", "3", "--epoch_count", "999999", "--epoch_begin", "0",
                     "--micro_bsz", str(MICRO_BSZ), "--accelerator", "gpu"]


def ours_sets(shape: str, variant: list[str]) -> list[str]:
    n_layer, n_embd = SHAPES[shape]
    return [f"data.magic_prime={MAGIC_PRIME}", f"data.my_exit_tokens={EXIT_TOKENS}", f"model.n_layer={n_layer}",
            f"model.n_embd={n_embd}", "train.strategy=auto", *variant]


def official_env(ext_dir: Path) -> dict:
    """The official processes' environment: DeepSpeed cannot parse arch suffixes ('9.0a'), so they get them
    stripped by our own helper (ours keeps the list as it is: its kernel build is keyed on it)."""
    sys.path.insert(0, str(ROOT))
    from rwkv7.wkv_cuda import normalise_arch_list_for_deepspeed

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    normalise_arch_list_for_deepspeed()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    if saved is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    return env


def launcher(*args: str) -> list[str]:
    return [sys.executable, str(LAUNCHER), *args]


def show(cmd: list[str], cwd: Path | None = None) -> str:
    return (f"(cd {shlex.quote(str(cwd))} && " if cwd else "") + shlex.join(cmd) + (")" if cwd else "")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(cmd: list[str], cwd: Path, env: dict, log_path: Path, timeout: float) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        try:
            return subprocess.run(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


# ---------------------------------------------------------------------------------------------------- the stages

def record_extensions(official: Path, env: dict, path: Path) -> list[dict]:
    """Import the official src/model.py with its CUDA builds recorded, not run (works without a GPU)."""
    cmd = launcher("extensions", "--json", str(path), "--kernel", KERNEL, "--head-chunk", str(HEAD_CHUNK),
                   "--head-size", str(HEAD_SIZE))
    p = subprocess.run(cmd, cwd=official, env=env, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"importing the official src/model.py failed:\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(path.read_text())


def prebuild(official: Path, env: dict, specs: list[dict], work: Path) -> dict:
    """Every build in its own process, all at once; a failed one is reported (the official import then retries
    it itself, slower)."""
    jobs = {s["name"]: (launcher("build", "--spec", json.dumps(s)), official, env) for s in specs}
    jobs["deepspeed_fused_adam"] = (launcher("build", "--fused-adam"), official, env)
    jobs["ours_wkv7"] = ([sys.executable, str(ROOT / "kernels" / "build.py")], ROOT, dict(os.environ))
    procs = {}
    for name, (cmd, cwd, job_env) in jobs.items():
        f = open(work / "build" / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=cwd, env=job_env, stdout=f, stderr=subprocess.STDOUT), f, time.time())
    result = {}
    for name, (proc, f, t) in procs.items():
        rc = proc.wait()
        f.close()
        result[name] = {"rc": rc, "s": round(time.time() - t, 1)}
        if rc:
            log(f"build {name} failed (rc {rc}):\n{tail(work / 'build' / f'{name}.log')}")
    return result


def init_weights(official: Path, env: dict, shapes: list[str], data: str, work: Path, timeout: float) -> dict:
    """Official stage 1 (seed 42) for every shape, in parallel (CPU work, before anything is timed). A finished
    rwkv-init.pth (marked by init.done) is reused."""
    procs, result = {}, {}
    for shape in shapes:
        proj = work / shape / "init"
        if (proj / "init.done").is_file():
            result[shape] = {"rc": 0, "s": 0.0, "reused": True, "sha256": sha256_if(proj)}
            continue
        shutil.rmtree(proj, ignore_errors=True)
        proj.mkdir(parents=True)
        f = open(work / shape / "init.log", "w")
        cmd = [sys.executable, "train.py", *official_args(shape, data, proj, stage=1)]
        proc = subprocess.Popen(cmd, cwd=official, env=env, stdout=f, stderr=subprocess.STDOUT)
        procs[shape] = (proc, f, time.time())
    for shape, (proc, f, t) in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        f.close()
        ok = rc == 0 and (work / shape / "init" / "rwkv-init.pth").is_file()
        if ok:
            (work / shape / "init" / "init.done").write_text(sha256(work / shape / "init" / "rwkv-init.pth"))
        result[shape] = {"rc": rc, "s": round(time.time() - t, 1), "sha256": sha256_if(work / shape / "init")}
    return result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def sha256_if(proj: Path) -> str | None:
    done = proj / "init.done"
    return done.read_text() if done.is_file() else None


def run_official(official: Path, env: dict, shape: str, data: str, steps: int, work: Path, timeout: float) -> dict:
    proj = work / shape / "official"
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir(parents=True)
    os.symlink(work / shape / "init" / "rwkv-init.pth", proj / "rwkv-init.pth")  # train.py picks it up (stage 3)
    record = work / shape / "official.json"
    record.unlink(missing_ok=True)
    cmd = launcher("train", "--record", str(record), "--steps", str(steps), "--",
                   *official_args(shape, data, proj, stage=3))
    t = time.time()
    rc = run_logged(cmd, official, env, work / shape / "official.log", timeout)
    if rc or not record.is_file():
        return {"error": f"exit {rc}" + (" (timeout)" if rc == 124 else ""),
                "log_tail": tail(work / shape / "official.log")}
    rec = json.loads(record.read_text())
    rows = rec["rows"]
    return {**timing(rows), "wall_s": round(time.time() - t, 1),
            "first_step_s": round(rows[0]["time"] - rec["process_start"], 1),
            "losses": [r["loss"] for r in rows], "times": [round(r["time"] - rows[0]["time"], 4) for r in rows]}


def ours_dir(work: Path, shape: str, index: int) -> Path:
    return work / shape / f"ours-{index}"


def run_ours(shape: str, variant: list[str], index: int, data: str, steps: int, work: Path, ext_dir: Path,
             timeout: float) -> dict:
    out = ours_dir(work, shape, index)
    t = time.time()
    try:
        p = train(out, *ours_sets(shape, variant), data=data, steps=steps,
                  load_model=str(work / shape / "init" / "rwkv-init.pth"), timeout=timeout,
                  env={"TORCH_EXTENSIONS_DIR": str(ext_dir), "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"error": "timeout", "log_tail": "\n".join(text.splitlines()[-25:])}
    if p.returncode:
        return {"error": f"exit {p.returncode}", "log_tail": "\n".join((p.stdout + p.stderr).splitlines()[-25:])}
    rows = metric_rows(out)
    res = {**timing(rows, drop_last=True, tokens_per_step=rows[0].get("tokens_per_step") or TOKENS_PER_STEP),
           "wall_s": round(time.time() - t, 1), "first_step_s": round(rows[0]["time"] - t, 1),
           "losses": [r["loss"] for r in rows], "times": [round(r["time"] - rows[0]["time"], 4) for r in rows]}
    res["mfu_per_token_s"] = mfu_per_token_s(rows)
    res["metrics"] = throughput(rows)  # our own figures (tokens/s over >= 1 s windows), as a cross-check
    return res


# ---------------------------------------------------------------------------------------------------- report

def variant_name(variant: list[str]) -> str:
    return " ".join(variant) if variant else "default"


def table(report: dict) -> str:
    lines = [f"{'shape':6} {'run':34} {'steps':>5} {'ms/step':>8} {'tok/s':>9} {'x official':>10} {'peak GiB':>9} "
             f"{'MFU':>6}"]
    for shape, s in report["shapes"].items():
        off = s.get("official", {})
        per_tok = next((v.get("mfu_per_token_s") for v in s.get("ours", {}).values() if v.get("mfu_per_token_s")), None)
        for name, r in [("official train_temp", off)] + [(f"ours {k}", v) for k, v in s.get("ours", {}).items()]:
            if "error" in r or not r:
                lines.append(f"{shape:6} {name[:34]:34} {r.get('error', 'not run')}")
                continue
            x = 1.0 if r is off else ratio(r, off)
            mfu = f"{per_tok * r['tokens_per_s']:6.1%}" if per_tok else f"{'-':>6}"
            lines.append(f"{shape:6} {name[:34]:34} {r['steps']:>5} {r['step_ms']:>8.1f} {r['tokens_per_s']:>9,} "
                         f"{'-' if x is None else f'{x:.2f}x':>10} {r['peak_mem_gib']:>9.2f} {mfu}")
    return "\n".join(lines)


def trajectory_lines(report: dict) -> list[str]:
    lines = []
    for shape, s in report["shapes"].items():
        for name, t in s.get("trajectory", {}).items():
            if t.get("max_window_delta") is None:
                lines.append(f"{shape} ours {name}: {t['steps']} steps, fewer than one {t['window']}-step window")
                continue
            lines.append(f"{shape} ours {name} vs official, {t['steps']} steps: "
                         f"per-step max |d| {t['max_abs_delta']:.4f} "
                         f"(step {t['at_step']}), mean |d| {t['mean_abs_delta']:.4f}; {t['window']}-step window means "
                         f"max |d| {t['max_window_delta']:.4f} (limit {t['limit']}: "
                         f"{'PASS' if t['within_limit'] else 'FAIL'})")
    return lines


def write_report(path: Path, report: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)


def gpu_name() -> str:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return p.stdout.strip().splitlines()[0] if p.returncode == 0 and p.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def official_identity(official: Path) -> dict:
    """What ran: the commit if the copy carries a COMMIT file above it, and hashes of the files that matter."""
    ident = {"path": str(official)}
    for parent in [official, *official.parents][:4]:
        if (parent / "COMMIT").is_file():
            ident["commit"] = (parent / "COMMIT").read_text().strip()
            break
    for name in ("train.py", "src/model.py", "src/trainer.py"):
        ident[name] = sha256(official / name)[:16]
    return ident


# ---------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=Path,
                    help="RWKV-LM's RWKV-v7/train_temp folder (a git-ignored copy)")
    ap.add_argument("--data", required=True, help="binidx prefix (PREFIX.bin, PREFIX.idx), e.g. the stand-in corpus")
    ap.add_argument("--shapes", default="0.1b,0.4b,1.5b", help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--steps", type=int, default=400, help="steps at 0.1b (the trajectory comparison) [400]")
    ap.add_argument("--short-steps", type=int, default=40, help="steps at the larger shapes [40]")
    ap.add_argument("--ours-set", action="append", default=[], metavar="SECTION.KEY=VALUE[,...]",
                    help="one more variant of ours with these --set overrides, separated by commas or spaces "
                    "(repeatable); without it: our default only")
    ap.add_argument("--no-default", action="store_true", help="run only the --ours-set variants")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/vs-official"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/vs-official-work"), help="weights, run folders, logs")
    ap.add_argument("--ext-dir", type=Path,
                    default=Path(os.environ.get("TORCH_EXTENSIONS_DIR") or "/tmp/vs-official-ext"),
                    help="TORCH_EXTENSIONS_DIR for the official extensions [$TORCH_EXTENSIONS_DIR]")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed to each run [300]")
    ap.add_argument("--skip-build", action="store_true", help="the extensions are built already")
    ap.add_argument("--build-only", action="store_true", help="build, write the initial weights (stage 1), stop: "
                    "a later call with --skip-build on the same machine reuses both")
    ap.add_argument("--dry-run", action="store_true", help="import the official model module (no GPU needed), "
                    "print what would run, and stop")
    args = ap.parse_args(argv)
    args.official = args.official.resolve()
    if not (args.official / "train.py").is_file() or not (args.official / "src" / "model.py").is_file():
        raise BadInput(f"--official {args.official}: no train.py and src/model.py there; point it at RWKV-LM's "
                       "RWKV-v7/train_temp folder")
    args.data = str(Path(args.data).resolve())
    for ext in (".bin", ".idx"):
        if not Path(args.data + ext).is_file():
            raise BadInput(f"--data {args.data}: {args.data + ext} not found; give a binidx prefix (without .bin/.idx)")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or not args.shapes:
        raise BadInput(f"--shapes: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(SHAPES)}")
    for name in ("steps", "short_steps"):
        if getattr(args, name) < 3:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 3 (warm-up plus timed steps)")
    args.variants = ([] if args.no_default else [[]]) + [v.replace(",", " ").split() for v in args.ours_set]
    for v in args.variants:
        bad = [s for s in v if "=" not in s or "." not in s.split("=", 1)[0]]
        if bad:
            raise BadInput(f"--ours-set {' '.join(v)!r}: {bad[0]!r} is not SECTION.KEY=VALUE")
    if not args.variants:
        raise BadInput("--no-default without any --ours-set leaves nothing of ours to run")
    return args


def steps_for(shape: str, args) -> int:
    return args.steps if shape == "0.1b" else args.short_steps


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = official_env(args.ext_dir)
    work, out = args.work.resolve(), args.out.resolve()
    (work / "build").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "gpu": gpu_name(),
              "official": official_identity(args.official),
              "data": args.data, "tokens_per_step": TOKENS_PER_STEP, "warmup": "first min(20, N/3) steps",
              "window": WINDOW, "variants": [variant_name(v) for v in args.variants], "shapes": {}}
    log(f"official {report['official']}; GPU {report['gpu']}; TORCH_EXTENSIONS_DIR {args.ext_dir}")

    try:
        specs = record_extensions(args.official, env, work / "extensions.json")
    except RuntimeError as e:  # e.g. pytorch-lightning or deepspeed missing: nothing can run
        print(f"error: {e}", file=sys.stderr)
        return 1
    log(f"the official import JIT-builds {len(specs)} extensions: {', '.join(s['name'] for s in specs)}, "
        "and DeepSpeed's FusedAdam")
    if args.dry_run:
        for s in specs:
            print("build:", show(launcher("build", "--spec", json.dumps(s)), args.official))
        print("build:", show(launcher("build", "--fused-adam"), args.official))
        print("build:", show([sys.executable, str(ROOT / "kernels" / "build.py")], ROOT))
        for shape in args.shapes:
            init = work / shape / "init"
            stage1 = [sys.executable, "train.py", *official_args(shape, args.data, init, 1)]
            print(f"{shape} official stage 1:", show(stage1, args.official))
            stage3 = launcher("train", "--record", str(work / shape / "official.json"), "--steps",
                              str(steps_for(shape, args)), "--",
                              *official_args(shape, args.data, work / shape / "official", 3))
            print(f"{shape} official stage 3:", show(stage3, args.official))
            for i, v in enumerate(args.variants):
                print(f"{shape} ours {variant_name(v)}:",
                      show(train_command(ours_dir(work, shape, i), *ours_sets(shape, v), data=args.data,
                                         steps=steps_for(shape, args), load_model=str(init / "rwkv-init.pth")), ROOT))
        return 0

    path = out / "vs_official.json"
    if not args.skip_build:
        log(f"building {len(specs) + 2} extensions in parallel")
        report["build"] = prebuild(args.official, env, specs, work)
        log(f"built: {json.dumps(report['build'])}")
        write_report(path, report)
    log(f"official stage 1 (seed 42) for {', '.join(args.shapes)}, in parallel")
    report["init"] = init_weights(args.official, env, args.shapes, args.data, work, args.timeout)
    log(f"init: {json.dumps(report['init'])}")
    write_report(path, report)
    if args.build_only:
        return 0 if all(r.get("sha256") for r in report["init"].values()) else 1
    for shape in args.shapes:
        s = report["shapes"][shape] = {"steps": steps_for(shape, args), "ours": {}, "trajectory": {}}
        if report["init"][shape]["rc"] or not report["init"][shape].get("sha256"):
            s["official"] = {"error": f"stage 1 failed (rc {report['init'][shape]['rc']})",
                             "log_tail": tail(work / shape / "init.log")}
            log(f"{shape}: {s['official']['error']}\n{s['official']['log_tail']}")
            write_report(path, report)
            continue
        n = steps_for(shape, args)
        log(f"{shape}: official, {n} steps")
        s["official"] = guarded(run_official, args.official, env, shape, args.data, n, work, args.timeout)
        log(f"{shape}: official " + summary(s["official"]))
        write_report(path, report)
        for i, v in enumerate(args.variants):
            name = variant_name(v)
            log(f"{shape}: ours {name}, {n} steps")
            r = s["ours"][name] = guarded(run_ours, shape, v, i, args.data, n, work, args.ext_dir, args.timeout)
            log(f"{shape}: ours {name} " + summary(r))
            if "error" not in r and "error" not in s["official"]:
                r["x_official"] = ratio(r, s["official"])
                s["trajectory"][name] = trajectory(s["official"]["losses"], r["losses"])
            write_report(path, report)
    print()
    for line in trajectory_lines(report):
        print(line)
    print(f"\nside by side on {report['gpu']}, {report['date']} (results: {path}; total {time.time() - T0:.0f} s)")
    print(table(report))
    return 0


def guarded(fn, *args) -> dict:
    """One run's result, or its error: a failure (even one of ours reading the results) never ends the benchmark."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (reported in the table and the JSON, the other runs go on)
        return {"error": f"{type(e).__name__}: {e}"}


def summary(r: dict) -> str:
    if "error" in r:
        return f"FAILED: {r['error']}\n{r.get('log_tail', '')}"
    return (f"{r['steps']} steps, {r['step_ms']:.1f} ms/step = {r['tokens_per_s']:,} tok/s, "
            f"peak {r['peak_mem_gib']:.2f} GiB, "
            f"first step after {r['first_step_s']} s, loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")


if __name__ == "__main__":
    sys.exit(main())
