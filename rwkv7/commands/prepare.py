"""`rwkv7 prepare`: private .jsonl / .txt -> binidx with the RWKV World tokenizer (docs/DATA.md).

`rwkv7 prepare --check PREFIX` instead validates an existing binidx (structure, token ids < 65536) and prints
its size and magic_prime.
"""
from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize .jsonl/.txt files into binidx (World tokenizer), or --check one",
                       description="Tokenize private text into the binidx format the trainer reads: every document "
                       "becomes its World-tokenizer ids plus the end-of-document token 0, as uint16.")
    p.add_argument("--input", nargs="+", action="extend", default=[], metavar="FILE",
                   help=".jsonl (one {\"text\": ...} object per line) or .txt files; repeatable")
    p.add_argument("--out", metavar="PREFIX", help="output prefix: writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--text-key", default="text", help="JSONL key holding the text (default: text)")
    p.add_argument("--split-blank-lines", action="store_true",
                   help=".txt: one document per blank-line-separated block (default: one document per file)")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of documents (evenly spaced) as PREFIX-val (default 0)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"tokenizer processes (default: all cores, {os.cpu_count()} here)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count malformed lines instead of stopping")
    p.add_argument("--ctx-len", type=int, default=512, help="context length for the suggested magic_prime (512)")
    p.add_argument("--check", metavar="PREFIX", help="validate an existing binidx instead of preparing one")
    p.add_argument("--vocab-size", type=int, default=65536, help="for --check: ids must be below this (65536)")
    p.set_defaults(func=run)


def check(prefix: str, ctx_len: int, vocab_size: int) -> int:
    from rwkv7.data.binidx import check_vocab, open_binidx
    from rwkv7.data.magic import magic_prime
    from rwkv7.errors import UserError

    data = open_binidx(prefix)
    check_vocab(data, vocab_size)
    print(f"{data.prefix}.bin/.idx: ok, {data.n_docs:,} documents, {len(data):,} tokens, {data.dtype}")
    try:
        print(f"magic_prime for ctx_len {ctx_len}: {magic_prime(len(data), ctx_len)}")
    except UserError as e:
        print(f"no magic_prime: {e}")
    return 0


def run(args) -> int:
    from rwkv7.errors import UserError

    if args.check:
        if args.input or args.out:
            raise UserError("--check validates an existing binidx: leave out --input and --out")
        return check(args.check, args.ctx_len, args.vocab_size)
    if not args.input:
        raise UserError("give the text to tokenize with --input FILE... (or --check PREFIX to validate a binidx)")
    if not args.out:
        raise UserError("give the output prefix with --out PREFIX (writes PREFIX.bin and PREFIX.idx)")
    from rwkv7.data.prepare import prepare, summary

    res = prepare(args.input, args.out, text_key=args.text_key, split_blank_lines=args.split_blank_lines,
                  val_fraction=args.val_fraction, workers=args.workers, skip_bad=args.skip_bad, ctx_len=args.ctx_len)
    print(summary(res))
    return 0
