"""`rwkv7 init --recipe NAME --out FILE`: write the official initial weights and print the parameter table."""
from __future__ import annotations

from pathlib import Path

from rwkv7.cliargs import overrides, recipe_parser


def register(sub) -> None:
    p = recipe_parser(sub, "init", "write rwkv-init.pth for a recipe and print its parameter table",
                      "Initialise a recipe's model exactly as the official trainer does (seeded), print every "
                      "parameter's shape, optimizer group and init rule, and save the weights.",
                      "output .pth [out/<recipe>/rwkv-init.pth]")
    p.add_argument("--seed", type=int, help="init seed [the recipe's train.seed]")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.checkpoint import save_weights
    from rwkv7.errors import UserError
    from rwkv7.fsutil import folder_problem
    from rwkv7.init import init_model, parameter_table
    from rwkv7.model import ModelShape, RWKV7
    from rwkv7.recipe import load_recipe

    r = load_recipe(args.recipe, overrides(args))
    out = Path(args.out or Path("out") / r.name / "rwkv-init.pth")
    _, problem = folder_problem(out.parent, "the folder of --out")
    if problem or out.is_dir():
        raise UserError(f"{problem or f'--out {out} is a folder'}: give --out a writable file path")
    m = r.model
    model = RWKV7(ModelShape(m.n_layer, m.n_embd, m.vocab_size, m.head_size))
    init_model(model, seed=r.train.seed if args.seed is None else args.seed, bf16_round=r.train.init_bf16_round)
    rows = parameter_table(model, r.train.weight_decay)
    print(f"{'name':34} {'shape':>14} {'group':>9} {'lr':>4} {'wd':>6} {'init':>30} {'count':>12}")
    for row in rows:
        shape = "x".join(map(str, row["shape"]))
        print(f"{row['name']:34} {shape:>14} {row['group']:>9} {row['lr_scale']:>4g} {row['wd']:>6g} "
              f"{row['init']:>30} {row['count']:>12,}")
    print(f"total parameters: {sum(r_['count'] for r_ in rows):,}")
    try:
        save_weights(model, out)
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror or e}): check the disk space and permissions") from None
    print(f"wrote {out}")
    return 0
