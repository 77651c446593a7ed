"""`rwkv7 plan --recipe R --gpus N [--gpu-mem GiB]`: memory per GPU for each strategy, throughput, time to finish."""
from __future__ import annotations

from rwkv7.cliargs import overrides, recipe_parser


def register(sub) -> None:
    p = recipe_parser(sub, "plan", "estimate memory per GPU, throughput and time to finish for each strategy",
                      "Estimate, for a recipe on N GPUs, the memory each strategy needs per GPU (weights, optimizer, "
                      "loss head, activations with the recipe's grad_cp), the measured throughput where we have "
                      "one (H200), the time to finish the recipe's token budget, and recommend a strategy.")
    p.add_argument("--gpus", type=int, default=1, help="GPUs in total [1]")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU [80]")
    p.add_argument("--host-mem", type=float, default=None, help="GiB of host memory per GPU for offload")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.errors import UserError
    from rwkv7.plan import count_parameters, plan, recommend
    from rwkv7.recipe import load_recipe
    from rwkv7.train.schedule import total_steps

    if args.gpus < 1 or args.gpu_mem <= 0:
        raise UserError("--gpus must be >= 1 and --gpu-mem > 0")
    r = load_recipe(args.recipe, overrides(args) + [f"train.devices={args.gpus}"])  # micro_bsz stays per GPU
    params = count_parameters(r)
    rows = plan(r, args.gpus, args.gpu_mem, args.host_mem)
    print(f"recipe {r.name}: {params:,} parameters, micro_bsz {r.train.micro_bsz} x ctx {r.train.ctx_len}, "
          f"grad_cp {r.train.grad_cp}, {args.gpus} GPU(s) of {args.gpu_mem:g} GiB")
    print(f"{'strategy':28} {'GPU GiB':>8} {'host GiB':>9} {'fits':>5} {'tok/s/GPU':>10}")
    for e in rows:
        tok = f"{e.tokens_per_s:,.0f}" if e.tokens_per_s else "-"
        print(f"{e.strategy:28} {e.gpu_gib:>8.1f} {e.host_gib:>9.1f} {'yes' if e.fits else 'no':>5} {tok:>10}"
              f"  {e.note}".rstrip())
    best = recommend(rows)
    if best is None:
        print("nothing fits: lower train.micro_bsz, set train.grad_cp=1, or use more GPUs")
        return 0
    tokens = r.data.my_exit_tokens or 0
    line = f"recommended: train.strategy={best.strategy}"
    if best.tokens_per_s and tokens:
        steps = total_steps(tokens, r.tokens_per_step)
        hours = steps * r.tokens_per_step / (best.tokens_per_s * args.gpus) / 3600
        line += (f"; {tokens:,} tokens at the measured {best.tokens_per_s:,.0f} tok/s per GPU (H200, assuming linear "
                 f"scaling) take about {hours:.1f} h")
    print(line)
    print("(memory figures are estimates: see rwkv7/plan.py; throughput only where measured, docs/PERFORMANCE.md)")
    return 0

