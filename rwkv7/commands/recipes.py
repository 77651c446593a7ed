"""`rwkv7 recipes`: list the named recipes with their model size and data."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("recipes", help="list the named recipes")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.plan import count_parameters
    from rwkv7.recipe import available, load_recipe

    print(f"{'recipe':12} {'L':>3} {'D':>5} {'params':>14} {'ctx':>5} {'bsz':>4} {'device':>6}  data / description")
    for name in available():
        r = load_recipe(name)
        m = r.model
        n = count_parameters(r)
        data = r.data.hub_repo or r.data.path or r.data.source
        print(f"{name:12} {m.n_layer:>3} {m.n_embd:>5} {n:>14,} {r.train.ctx_len:>5} {r.real_bsz:>4} "
              f"{r.train.accelerator:>6}  {data}: {r.description}")
    return 0
