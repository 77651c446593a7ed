"""`rwkv7 eval --model F.pth --data PREFIX`: held-out loss and perplexity over the first N tokens of a binidx split."""
from __future__ import annotations

import json
import sys

from rwkv7.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a model on a binidx split",
                       description="Mean next-token cross-entropy over contiguous, non-overlapping windows of "
                                   "--ctx-len tokens from the start of the data (see docs/GENERATE.md).")
    p.add_argument("--model", required=True, metavar="PTH", help="weights file, e.g. out/tiny/rwkv-final.pth")
    p.add_argument("--data", required=True, metavar="PREFIX", help="binidx prefix (path without .bin/.idx)")
    p.add_argument("--tokens", type=int, default=None, metavar="N", help="use the first N tokens [all]")
    p.add_argument("--ctx-len", type=int, default=512, help="window length [512]")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass [8]")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[cuda if available, else cpu]")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="[bf16 on cuda, fp32 on cpu]")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text line")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.tokens is not None and args.tokens < 2:
        raise UserError(f"--tokens must be >= 2 (got {args.tokens})")
    if args.ctx_len < 1:
        raise UserError(f"--ctx-len must be >= 1 (got {args.ctx_len})")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1 (got {args.batch})")
    from rwkv7.cliargs import open_model
    from rwkv7.data.binidx import check_vocab, open_binidx
    from rwkv7.evaluate import evaluate_loss, perplexity

    data = open_binidx(args.data)  # cheap structural checks before loading the model
    model, path = open_model(args.model, args.device, args.dtype)
    check_vocab(data, model.shape.vocab_size)  # integer ids the model can embed
    loss, n = evaluate_loss(model, data.tokens, args.ctx_len, args.tokens, args.batch)
    result = {"loss": loss, "perplexity": perplexity(loss), "tokens": n, "windows": n // args.ctx_len,
              "ctx_len": args.ctx_len, "model": str(path), "data": data.prefix,
              "device": model.emb.weight.device.type, "dtype": str(model.emb.weight.dtype).replace("torch.", "")}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {loss:.6f}  perplexity {result['perplexity']:.4f}  over {n} tokens "
              f"({result['windows']} windows of {args.ctx_len}) from {data.prefix}")
    sys.stdout.flush()
    return 0
