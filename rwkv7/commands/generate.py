"""`rwkv7 generate --model F.pth --prompt TEXT`: prefill in parallel, decode in RNN mode, stream to stdout.

Tokenizer (--tokenizer auto, the default): `world` for vocab-65536 models (RWKV World, the official data's), else `ids`.
  world  text in, text out.
  bytes  the prompt's UTF-8 bytes are the ids (needs vocab >= 256); output ids < 256 are written as bytes.
  ids    the prompt is token ids ("12 7 300" or "12,7,300"); output is ids separated by spaces.
Generation stops early once every sample has produced the end-of-document token 0, unless --ignore-eod.
"""
from __future__ import annotations

import codecs
import re
import sys

from rwkv7.errors import UserError

TOKENIZERS = ("auto", "world", "bytes", "ids")
MAX_TOKENS, MAX_BATCH = 1_000_000, 4096  # beyond these a typo would hold the machine for hours


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained model (RNN-mode decoding)",
                       description="Prefill the prompt in parallel, then decode token by token with the carried "
                                   "RNN state. Text goes to stdout, tokens/s to stderr. See docs/GENERATE.md.")
    p.add_argument("--model", required=True, metavar="PTH", help="weights file, e.g. out/tiny/rwkv-final.pth")
    p.add_argument("--prompt", required=True, help="prompt text (token ids with --tokenizer ids)")
    p.add_argument("--tokens", type=int, default=200, metavar="N", help="new tokens to generate per sample [200]")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature; 0 = greedy [1.0]")
    p.add_argument("--top-p", type=float, default=0.85, metavar="P", help="nucleus sampling mass, in (0, 1] [0.85]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: nondeterministic)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="[cuda if available, else cpu]")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto", help="[bf16 on cuda, fp32 on cpu]")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="auto",
                   help="auto: world for vocab 65536, else ids [auto]")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="generate B samples of the prompt at once [1]")
    p.add_argument("--ignore-eod", action="store_true", help="do not stop at the end-of-document token 0")
    p.add_argument("--no-graph", action="store_true", help="no CUDA graph for the decode step (CUDA only)")
    p.set_defaults(func=run)


def check_sampling_args(args) -> None:
    if args.tokens < 1:
        raise UserError(f"--tokens must be >= 1 (got {args.tokens})")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if not args.temperature >= 0:  # also rejects nan
        raise UserError(f"--temperature must be >= 0 (got {args.temperature}); 0 means greedy")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1 (got {args.batch})")
    if args.tokens > MAX_TOKENS or args.batch > MAX_BATCH:
        raise UserError(f"--tokens (at most {MAX_TOKENS:,}) or --batch (at most {MAX_BATCH}) is too large: "
                        "generate in several calls")
    if args.seed is not None and not 0 <= args.seed < 1 << 63:
        raise UserError(f"--seed must be in [0, 2^63) (got {args.seed})")
    if not args.prompt:
        raise UserError("--prompt is empty: give at least one token of prompt")


def pick_tokenizer(name: str, vocab: int) -> str:
    if name == "auto":
        return "world" if vocab == 65536 else "ids"
    if name == "world" and vocab != 65536:
        raise UserError(f"--tokenizer world needs a vocab-65536 model, this one has {vocab}: use --tokenizer ids")
    if name == "bytes" and vocab < 256:
        raise UserError(f"--tokenizer bytes needs vocab >= 256, this model has {vocab}: use --tokenizer ids")
    return name


def encode_prompt(prompt: str, tok: str, vocab: int) -> list[int]:
    if tok == "world":
        from rwkv7.data.tokenizer import encode

        try:
            ids = encode(prompt)
        except UnicodeEncodeError:
            raise UserError("--prompt is not valid Unicode text") from None
    elif tok == "bytes":
        ids = list(prompt.encode("utf-8"))
    else:
        parts = [s for s in re.split(r"[\s,]+", prompt.strip()) if s]
        if not all(re.fullmatch(r"\d+", s) for s in parts):
            raise UserError(f"--tokenizer ids wants the prompt as token ids like '12 7 300' (got {prompt!r})")
        ids = [int(s) for s in parts]
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
    if not ids:
        raise UserError("--prompt encodes to no tokens: give a non-empty prompt")
    return ids


class Printer:
    """Streams new tokens of one sample to a text stream (incremental UTF-8 for world/bytes)."""

    def __init__(self, tok: str, out):
        self.tok, self.out = tok, out
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, ids: list[int]) -> None:
        if self.tok == "ids":
            self.out.write("".join(f" {i}" for i in ids))
        else:
            if self.tok == "world":
                from rwkv7.data.tokenizer import WorldTokenizer

                data = WorldTokenizer.decode_bytes(ids)
            else:
                data = bytes(i for i in ids if i < 256)
            self.out.write(self.utf8.decode(data))
        self.out.flush()

    def close(self) -> None:
        if self.tok != "ids":
            self.out.write(self.utf8.decode(b"", final=True))
        self.out.write("\n")
        self.out.flush()


def run(args) -> int:
    check_sampling_args(args)
    from rwkv7.cliargs import open_model
    from rwkv7.generate import generate

    model, path = open_model(args.model, args.device, args.dtype)
    vocab = model.shape.vocab_size
    tok = pick_tokenizer(args.tokenizer, vocab)
    ids = encode_prompt(args.prompt, tok, vocab)
    stop = None if args.ignore_eod else 0
    out = sys.stdout
    if args.batch == 1:
        printer = Printer(tok, out)
        if tok == "ids":
            out.write(" ".join(map(str, ids)) + " |")
        else:
            out.write(args.prompt)
        stream = lambda row: printer([t for t in row if not (stop is not None and t == stop)])  # noqa: E731
        result = generate(model, [ids], args.tokens, args.temperature, args.top_p, args.seed, stop, stream,
                          graph=False if args.no_graph else None)
        printer.close()
    else:
        result = generate(model, [ids] * args.batch, args.tokens, args.temperature, args.top_p, args.seed, stop,
                          graph=False if args.no_graph else None)
        for b, row in enumerate(result.tokens):
            out.write(f"--- sample {b + 1}/{args.batch} ---\n")
            out.write(" ".join(map(str, ids)) + " |" if tok == "ids" else args.prompt)
            printer = Printer(tok, out)
            printer([t for t in row if not (stop is not None and t == stop)])
            printer.close()
    dev = f"{model.emb.weight.device.type} {str(model.emb.weight.dtype).replace('torch.', '')}"
    print(f"[{path.name}, {dev}] {result.timing_line()}", file=sys.stderr)
    return 0
