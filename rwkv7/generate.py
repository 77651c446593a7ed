"""Generation with a trained RWKV-7: parallel prefill, then RNN-mode decoding with the carried state.

    prefill(model, idx [B, T], state=None) -> (last logits [B, V] fp32, state)
    RNNDecoder(model, state).step(tokens [B]) -> logits [B, V]      one T=1 forward_with_state per token
    sample(logits [B, V], temperature, top_p, generator) -> [B]     greedy when temperature == 0
    generate(model, prompts, n_tokens, ...) -> Generation           the whole loop, with timings

Prefill runs the prompt through model.forward_with_state in chunks of at most `PREFILL_CHUNK` tokens (bounds the
[B, T, V] logits; the state carries across chunks, so this equals one call). When the wkv CUDA kernel will take the
call (CUDA tensors, kernel available), every chunk but the last is a multiple of 16 and the last is split into a
multiple-of-16 head (kernel) plus a tail of < 16 tokens, for which rwkv7.wkv's dispatch picks the torch reference
(the kernel is only used when T % 16 == 0). Decoding is one token per forward_with_state call, T=1, so it also uses
the torch reference, which for a single step is a handful of small ops. On CUDA the step is captured once as a CUDA
graph (static token and state buffers), which removes the Python and launch overhead that dominates T=1 steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

PREFILL_CHUNK = 4096  # tokens per forward_with_state call during prefill (a multiple of 16)
KERNEL_ALIGN = 16


def kernel_active(device: torch.device) -> bool:
    """True when rwkv7.wkv would run our CUDA kernel for tensors on `device` (given T % 16 == 0)."""
    if torch.device(device).type != "cuda":
        return False
    import os

    if os.environ.get("RWKV7_WKV_BACKEND", "auto") == "torch":
        return False
    try:
        from rwkv7 import wkv_cuda
    except ImportError:
        return False
    return bool(wkv_cuda.available())


def prefill_chunks(T: int, align: int = 1, chunk: int = PREFILL_CHUNK) -> list[int]:
    """Chunk lengths covering T tokens: full `chunk`s, then a multiple of `align`, then a remainder < align."""
    sizes = []
    while T > chunk:
        sizes.append(chunk)
        T -= chunk
    head = T - T % align
    sizes += [n for n in (head, T - head) if n]
    return sizes


def _state_device(state) -> torch.device:
    return state[0][0][0].device


@torch.no_grad()
def prefill(model, idx: torch.Tensor, state: Optional[list] = None, align: Optional[int] = None,
            chunk: int = PREFILL_CHUNK) -> tuple[torch.Tensor, list]:
    """Run the prompt idx [B, T] (T >= 1) in parallel; returns (logits of its last position [B, V] fp32, state).

    align: chunk lengths are multiples of this except the final tail (default: 16 when the CUDA kernel is active,
    else 1). Chunking never changes the result beyond float rounding: the state carries over exactly.
    """
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"prefill needs idx [B, T] with T >= 1, got {tuple(idx.shape)}")
    if state is None:
        state = model.zero_state(idx.shape[0], device=idx.device)
    if align is None:
        align = KERNEL_ALIGN if kernel_active(idx.device) else 1
    if chunk % align:
        raise ValueError(f"prefill chunk {chunk} is not a multiple of align {align}")
    pos, logits = 0, None
    for n in prefill_chunks(idx.shape[1], align, chunk):
        logits, state = model.forward_with_state(idx[:, pos:pos + n], state)
        pos += n
    return logits[:, -1].float(), state


def _flat(state) -> list[torch.Tensor]:
    return [t for (att_x, wkv), ffn_x in state for t in (att_x, wkv, ffn_x)]


def _unflat(flat: list[torch.Tensor]) -> list:
    return [((flat[i], flat[i + 1]), flat[i + 2]) for i in range(0, len(flat), 3)]


class RNNDecoder:
    """One token per step through model.forward_with_state (T=1), carrying the state.

    graph=True (default on CUDA): the step is captured once as a CUDA graph over static token/state buffers and
    replayed; the returned logits live in a static buffer, valid until the next step. `state` is the current state.
    """

    def __init__(self, model, state: list, graph: Optional[bool] = None):
        self.model = model
        self.device = _state_device(state)
        self.batch = state[0][0][0].shape[0]
        self.graph_enabled = (self.device.type == "cuda") if graph is None else graph
        self._state = state
        self._graph = None
        if self.graph_enabled:
            self._capture()

    @property
    def state(self) -> list:
        return self._state

    @torch.no_grad()
    def _capture(self) -> None:
        if self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self._tok = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        flat = [t.clone() for t in _flat(self._state)]
        static_state = _unflat(flat)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (allocator, lazy inits) off the capture
            for _ in range(2):
                self.model.forward_with_state(self._tok, static_state)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits, new_state = self.model.forward_with_state(self._tok, static_state)
            for dst, src in zip(flat, _flat(new_state)):
                dst.copy_(src)
        self._logits = logits[:, -1]
        self._graph = graph
        self._state = static_state

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (long, on the model's device) -> logits [B, V] (model dtype); advances the state."""
        if self._graph is not None:
            self._tok.copy_(tokens.view(self.batch, 1))
            self._graph.replay()
            return self._logits
        logits, self._state = self.model.forward_with_state(tokens.view(self.batch, 1), self._state)
        return logits[:, -1]


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token per row of logits [B, V]: argmax when temperature == 0, else softmax(logits / temperature)
    restricted to the smallest set of most likely tokens whose probability reaches top_p (nucleus), renormalised."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the top token always stays (before = 0)
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row (after the prompt; up to and including a stop token)
    prompt_tokens: int  # per row
    prefill_s: float
    decode_s: float
    decode_steps: int  # T=1 forward passes (each yields one token per row)
    batch: int
    stopped: list[bool] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tok_s(self) -> float:
        return self.batch * self.decode_steps / self.decode_s if self.decode_s > 0 else float("nan")

    def timing_line(self) -> str:
        dec = (f"decode {self.decode_steps * self.batch} tokens in {self.decode_s:.3f} s "
               f"({self.decode_tok_s:.1f} tok/s)" if self.decode_steps else "decode: no steps")
        return (f"prefill {self.prompt_tokens * self.batch} tokens in {self.prefill_s:.3f} s "
                f"({self.prefill_tok_s:.1f} tok/s); {dec}; batch {self.batch}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], n_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             seed: Optional[int] = None, stop_token: Optional[int] = None,
             on_tokens: Optional[Callable[[list[int]], None]] = None, graph: Optional[bool] = None) -> Generation:
    """Generate n_tokens per prompt (all prompts the same length; batch = len(prompts)).

    The first new token is sampled from the prefill's last logits; each further one costs one T=1 step.
    stop_token: a row ends once it has produced it (kept in its output); the loop ends when every row has.
    on_tokens(list of B ids): called with each new token row as soon as it is sampled (forces a device sync).
    """
    if n_tokens < 1:
        raise ValueError("n_tokens must be >= 1")
    lengths = {len(p) for p in prompts}
    if not prompts or len(lengths) != 1 or 0 in lengths:
        raise ValueError("prompts must be non-empty and all of the same length")
    device = model.emb.weight.device
    B = len(prompts)
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # a fresh nondeterministic seed
    else:
        gen.manual_seed(seed)
    idx = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)

    align = KERNEL_ALIGN if kernel_active(device) else 1  # loads the wkv kernel (once) outside the timing
    if device.type == "cuda":  # one-time CUDA/cuBLAS/kernel initialisation, also outside the timing
        warm, _ = prefill(model, idx[:1, :min(idx.shape[1], KERNEL_ALIGN)], align=align)
        sample(warm, temperature, top_p, torch.Generator(device=device).manual_seed(0))
    _sync(device)
    t0 = time.perf_counter()
    logits, state = prefill(model, idx, align=align)
    tok = sample(logits, temperature, top_p, gen)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B

    def emit(tok_row: torch.Tensor) -> bool:
        ids = tok_row.tolist()
        for b, t in enumerate(ids):
            if not done[b]:
                out[b].append(t)
                done[b] = stop_token is not None and t == stop_token
        if on_tokens is not None:
            on_tokens(ids)
        return all(done)

    if emit(tok) or n_tokens == 1:
        return Generation(out, len(prompts[0]), prefill_s, 0.0, 0, B, done)
    decoder = RNNDecoder(model, state, graph=graph)  # the one-time CUDA graph capture is not timed
    t1 = time.perf_counter()
    steps = 0
    for _ in range(n_tokens - 1):
        tok = sample(decoder.step(tok), temperature, top_p, gen)
        steps += 1
        if emit(tok):
            break
    _sync(device)
    return Generation(out, len(prompts[0]), prefill_s, time.perf_counter() - t1, steps, B, done)
