"""The RWKV World tokenizer (vocab 65536, `rwkv_vocab_v20230424.txt`), id 0 = end of document.

Ids are those of the `rwkv` package's TRIE_TOKENIZER (rwkv 0.8.32), the tokenizer the official make_data.py uses:
greedy longest match over UTF-8 bytes. Encoding uses `pyrwkv-tokenizer` (Rust, same ids, about 10x faster) when
it imports, else TRIE_TOKENIZER. RWKV7_TOKENIZER=trie|pyrwkv forces one. Decoding is our own table lookup.
"""
from __future__ import annotations

import ast
import functools
import os
from pathlib import Path
from typing import Iterable, Sequence

from rwkv7.errors import UserError

VOCAB_SIZE = 65536
EOD = 0  # end-of-document token appended to every document (official make_data.py)
VOCAB_FILE = "rwkv_vocab_v20230424.txt"


def _vocab_path() -> Path:
    """The vocab file shipped inside the `rwkv` (preferred: it is the reference) or `pyrwkv_tokenizer` package."""
    import importlib.util
    for pkg in ("rwkv", "pyrwkv_tokenizer"):
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            for d in spec.submodule_search_locations:
                p = Path(d) / VOCAB_FILE
                if p.is_file():
                    return p
    raise UserError(f"the World tokenizer vocab {VOCAB_FILE} was not found: pip install rwkv==0.8.32 "
                    "(or pyrwkv-tokenizer)")


@functools.lru_cache(maxsize=1)
def vocab_bytes() -> tuple[bytes, ...]:
    """Token id -> bytes, index 0 (end of document) and unused ids map to b""."""
    table = [b""] * VOCAB_SIZE
    with open(_vocab_path(), "r", encoding="utf-8") as f:  # universal newlines: the rwkv copy has CRLF
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            idx = int(line[:line.index(" ")])
            tok = ast.literal_eval(line[line.index(" "):line.rindex(" ")].strip())
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if len(tok) != int(line[line.rindex(" "):]):
                raise UserError(f"corrupt tokenizer vocab {_vocab_path()}: length mismatch for id {idx}")
            table[idx] = tok
    return tuple(table)


class WorldTokenizer:
    """encode(str) -> list[int] (no EOD appended); decode(ids) -> str."""

    def __init__(self, backend: str | None = None):
        backend = (backend or os.environ.get("RWKV7_TOKENIZER") or "auto").lower()
        if backend not in ("auto", "pyrwkv", "trie"):
            raise UserError(f"RWKV7_TOKENIZER={backend!r}: use pyrwkv or trie")
        self._enc = None
        if backend in ("auto", "pyrwkv"):
            try:
                import pyrwkv_tokenizer
                tok = pyrwkv_tokenizer.RWKVTokenizer()
                self._enc = getattr(tok, "tokenizer", tok).encode  # the Rust object: skips a Python frame
                self.backend = "pyrwkv"
            except ImportError:
                if backend == "pyrwkv":
                    raise UserError("RWKV7_TOKENIZER=pyrwkv but pyrwkv-tokenizer is not installed: "
                                    "pip install pyrwkv-tokenizer") from None
        if self._enc is None:
            try:
                from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
            except ImportError:
                raise UserError("no World tokenizer: pip install rwkv==0.8.32 (or pyrwkv-tokenizer)") from None
            trie = TRIE_TOKENIZER(str(_vocab_path()))
            self._enc = trie.encode
            self.backend = "trie"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; raises UnicodeEncodeError for strings that are not valid Unicode (lone surrogates)."""
        if self.backend == "pyrwkv":
            text.encode("utf-8")  # the Rust side would silently replace lone surrogates; the reference raises
        return self._enc(text)

    @staticmethod
    def decode_bytes(ids: Iterable[int]) -> bytes:
        table = vocab_bytes()
        return b"".join(table[int(i)] for i in ids)

    @classmethod
    def decode(cls, ids: Iterable[int], errors: str = "strict") -> str:
        """Text of `ids`; the end-of-document token 0 decodes to nothing."""
        return cls.decode_bytes(ids).decode("utf-8", errors=errors)


@functools.lru_cache(maxsize=2)
def get_tokenizer(backend: str | None = None) -> WorldTokenizer:
    return WorldTokenizer(backend)


def encode(text: str) -> list[int]:
    return get_tokenizer().encode(text)


def decode(ids: Sequence[int] | Iterable[int], errors: str = "strict") -> str:
    return WorldTokenizer.decode(ids, errors)
