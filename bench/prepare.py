"""Tokenisation throughput of `rwkv7 prepare` (MB/s of input text), one worker and all cores.

Generates >= --mb MB of English-like JSONL (deterministic, seeded; word mix with punctuation, some digits and a
little non-ASCII), then runs the real prepare() on it, as `rwkv7 prepare` does, and prints one line per setting:
wall-clock MB/s, and MB per CPU-second (this process + the pool's workers), which is less sensitive to other load
on a shared machine.

    python bench/prepare.py [--mb 64] [--workers 1 N] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwkv7.data.prepare import prepare  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has would when if more will no other so what out up its "
         "into said time about only can some these two may first then do any like my now over such our man me even "
         "most made after also did many before must through years where much your way well down should because "
         "each just those people how too little state good very make world still see own men work long here get "
         "both between life being under never day same another know while last might great old year off come since "
         "against go came right used take three language model training recurrent network attention token data "
         "München café naïve 東京 数据").split()


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(mb * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = rng.randint(80, 1500)
            words = []
            for _ in range(n):
                w = rng.choice(WORDS)
                r = rng.random()
                if r < 0.07:
                    w = w.capitalize()
                elif r < 0.09:
                    w = str(rng.randint(0, 10 ** rng.randint(1, 5)))
                if rng.random() < 0.07:
                    w += rng.choice(".,;:!?")
                words.append(w)
                if rng.random() < 0.01:
                    words.append("\n\n")
            line = json.dumps({"text": " ".join(words)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    return written


def cpu_seconds() -> float:
    """User + system CPU time of this process and its reaped children (the pool's workers)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64.0, help="MB of generated JSONL (>= 50 for the report)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    ap.add_argument("--keep", help="folder for the corpus and outputs (default: a temp folder, removed)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        src = root / "bench.jsonl"
        t0 = time.perf_counter()
        size = make_corpus(src, args.mb)
        print(f"corpus: {size / 1e6:.1f} MB JSONL in {time.perf_counter() - t0:.1f} s; {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, python {platform.python_version()}")
        for w in dict.fromkeys(args.workers):
            cpu0 = cpu_seconds()
            res = prepare([src], root / f"out{w}", workers=w, progress=False)
            cpu = cpu_seconds() - cpu0
            print(f"workers={w}: {res.bytes_in / 1e6:.1f} MB, {res.docs:,} docs, {res.tokens:,} tokens in "
                  f"{res.seconds:.2f} s = {res.mb_per_s:.1f} MB/s wall ({res.tokens / res.seconds / 1e6:.2f} M tokens/s, "
                  f"{res.backend} tokenizer); {cpu:.2f} CPU-s = {res.bytes_in / 1e6 / cpu:.1f} MB per CPU-second; "
                  f"load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
