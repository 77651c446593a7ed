"""The "magic prime" of the official sampler (reference §5.2).

The trainer visits sample slots `((factor * ii**3) % p) * ctx_len` for ii = 1..p. Cubing is a bijection mod p when
p is prime and p % 3 == 2, so every ctx_len-aligned slot of the data is read exactly once per p samples. The data
preparation scripts pick the largest such p with p <= tokens // ctx_len - 1 (the `- 1` leaves room for the +1 token
of the last sample's target).
"""
from __future__ import annotations

from rwkv7.errors import UserError

# Deterministic Miller-Rabin witnesses: correct for every n < 3.3e24, far beyond any token count.
_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Exact primality for any n a dataset can produce (deterministic Miller-Rabin)."""
    n = int(n)
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def magic_prime(n_tokens: int, ctx_len: int) -> int:
    """Largest prime p with p % 3 == 2 and p <= n_tokens // ctx_len - 1.

    Raises UserError when the data holds fewer than 3 * ctx_len tokens (the official script's own limit).
    """
    n_tokens, ctx_len = int(n_tokens), int(ctx_len)
    if ctx_len <= 0:
        raise UserError(f"ctx_len must be positive, got {ctx_len}")
    if n_tokens < 3 * ctx_len:
        raise UserError(f"{n_tokens} tokens are too few for ctx_len {ctx_len}: the sampler needs at least "
                        f"{3 * ctx_len} (3 * ctx_len); add data or lower ctx_len")
    p = n_tokens // ctx_len - 1
    # step to the largest candidate <= p with p % 3 == 2, then walk down in steps of 3 (only those qualify)
    p -= (p - 2) % 3
    while p >= 2:
        if is_prime(p):
            return p
        p -= 3
    raise UserError(f"no prime p % 3 == 2 below {n_tokens // ctx_len}")  # unreachable: 2 qualifies
