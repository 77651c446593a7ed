"""`rwkv7 fetch`: download a tokenized binidx dataset from the Hugging Face Hub (default: MiniPile) and verify it.

Honours HF_ENDPOINT (mirror), HF_HUB_OFFLINE=1 (local copy only) and HF_TOKEN (private repos; never printed).
"""
from __future__ import annotations


def register(sub) -> None:
    from rwkv7.data.fetch import DEFAULT_FILES, DEFAULT_REPO

    p = sub.add_parser("fetch", help="download and verify a tokenized dataset from the Hugging Face Hub (MiniPile)",
                       description="Download a binidx pair from a Hub dataset repo into --data-dir, check size, "
                       "sha256 and structure, and print the prefix to train on.")
    p.add_argument("--repo", default=DEFAULT_REPO, help=f"dataset repo id (default {DEFAULT_REPO})")
    p.add_argument("--file", action="append", default=None, metavar="PATH",
                   help=f"file in the repo, repeatable: the .idx and the .bin (default {' '.join(DEFAULT_FILES)})")
    p.add_argument("--data-dir", default="data", help="local folder for the files (default ./data)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default main)")
    p.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                   help="expected sha256 of a file (path in the repo or base name); repeatable")
    p.add_argument("--force", action="store_true", help="download again even when a local copy exists")
    p.add_argument("--vocab-size", type=int, default=65536, help="token ids must be below this (65536)")
    p.set_defaults(func=run)


def run(args) -> int:
    from rwkv7.data.fetch import DEFAULT_FILES, fetch_dataset, parse_sha256

    prefix = fetch_dataset(args.repo, args.file or list(DEFAULT_FILES), args.data_dir, revision=args.revision,
                           sha256=parse_sha256(args.sha256), vocab_size=args.vocab_size, force=args.force)
    print(f"train on it with --set data.path={prefix}")
    return 0
