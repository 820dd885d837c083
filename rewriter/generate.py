"""Generation for a rewritten decoder: prefill the prompt, then decode one token per step through
the lowered graphs (rewriter.lower), with the state each rule needs (a KV cache, a linear
attention state, a window ring buffer, or nothing for a dropped layer).

`generate(model, input_ids, ...)` takes what transformers' `generate` takes and returns what it
returns: the prompt followed by the new tokens, [B, T + new], a batch left-padded by
`attention_mask`. Positions are counted from each row's first real token (cumsum of the mask − 1,
as transformers does), cache slots from the start of the padded batch. The caches are allocated
once for prompt + max_new_tokens slots and written in place (`Lowered.decode_inplace`: generate owns
them); the functional `Lowered.decode` computes the same. Greedy by default;
`do_sample` draws from softmax(logits / temperature) restricted to the `top_k` tokens and the
`top_p` nucleus (transformers' order: temperature, top-k, top-p). A row that emits
`eos_token_id` is finished: its later tokens are `pad_token_id`, and generation stops when every
row is. `eos_token_id` / `pad_token_id` left None take the model's `generation_config` values
where it has one (transformers' defaults; `eos_token_id=[]` never stops early).
`streamer.put(tokens)` / `streamer.end()` as transformers' streamers expect (the prompt first,
then each step's tokens). `stream(model, ...)` yields the same new tokens one step at a time.

`compile=True` runs each decode step through `torch.compile` (inductor; on the CPU, generated C++
with the step's elementwise ops fused around the matmuls and no Python per op), compiled once per
lowered model and batch/cache shape. The first step pays the compilation (`stats["compile_s"]`);
later steps are what a long generation or a server sees. Same function: the logits agree with the
eager step to float rounding (tests/generation/test_lowering.py). Measured side by side on SmolLM2
in benchmarks/bench_generate.py.
"""
from __future__ import annotations

import time
from collections.abc import Collection

import torch
import torch.utils._pytree as pytree

from .gate import prefill_length
from .lower import Lowered, LoweringError, lower_for_generation, state_bytes


class GenerationError(ValueError):
    """generate() cannot run for this model or these inputs; one line saying which and why."""


def lowered(model) -> Lowered:
    """The lowered graphs of an OptimizedModel, built once per graph (after `materialize()`, which
    folds what the graph rebuilds from stored tensors on each call, e.g. MASA's weights)."""
    io = model.io
    kind = getattr(io, "kind", None)
    if kind != "causal_lm":
        article = "an" if str(kind)[:1] in "aeiou" else "a"
        raise GenerationError(f"{getattr(io, 'name', 'the model')} is {article} {kind} model, not a causal "
                              f"LM: there is no next token to generate")
    cached = model.__dict__.get("_lowered")
    graph = model.graph_module.graph
    if cached is None or cached[0] is not graph or cached[1] != len(graph.nodes):
        model.materialize()
        gm = model.graph_module
        mask_inputs: Collection[str] = io.mask_inputs() if hasattr(io, "mask_inputs") else ()
        try:
            low = lower_for_generation(gm, list(model.sites), mask_inputs=mask_inputs)
        except LoweringError as e:
            raise GenerationError(f"cannot generate with {getattr(io, 'name', 'this model')}: {e}") from None
        cached = (gm.graph, len(gm.graph.nodes), low)
        model.__dict__["_lowered"] = cached
    return cached[2]


def _inputs(low: Lowered, tokens, mask, position_ids) -> list:
    """The lowered graphs' leading inputs: the traced inputs in their order (tokens, and the mask
    where the model was traced with one), then the positions."""
    named = {low.tokens: tokens}
    if low.mask is not None:
        named[low.mask] = mask
    return [named[n] for n in low.inputs] + [position_ids]


def _logits(low: Lowered, io, leaves) -> torch.Tensor:
    out = leaves[:low.n_outputs]
    if low.out_spec is not None:
        out = pytree.tree_unflatten(list(out), low.out_spec)
    return io.main_output(out) if hasattr(io, "main_output") else out[0]


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row from its last logits [B, V] (fp32)."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise GenerationError(f"temperature must be > 0 when sampling; got {temperature}")
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1)                     # ascending, as transformers' TopP
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False                                        # keep at least the best token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _ids_list(x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1)]
    return [int(v) for v in x] if isinstance(x, (list, tuple, set)) else [int(x)]


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
             streamer=None, generator: torch.Generator | None = None,
             stats: dict | None = None, compile: bool = False) -> torch.Tensor:
    """Prefill + decode of an OptimizedModel (module docstring): the prompt and the new tokens,
    [B, T + new]. `stats`, if a dict, receives the prefill and decode seconds, the decode steps and
    the state's bytes at the end."""
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    if streamer is not None:
        streamer.put(ids.cpu())
    new = []
    for nxt in stream(model, ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                      temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                      pad_token_id=pad_token_id, generator=generator, stats=stats, compile=compile):
        new.append(nxt)
        if streamer is not None:
            streamer.put(nxt.cpu())
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, torch.stack(new, 1)], 1) if new else ids.clone()


def stream(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
           generator: torch.Generator | None = None, stats: dict | None = None, compile: bool = False):
    """The new tokens of `generate`, one [B] tensor per step as soon as it is chosen: the first
    after the prefill, each later one after one decode step (so a caller can time or interleave
    the steps). The arguments are generate's; the inputs are checked before the prefill."""
    low = lowered(model)
    decode = low.compiled_decode() if compile else low.decode_inplace
    io = model.io
    ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
    if ids.dtype.is_floating_point or ids.dtype is torch.bool:
        raise GenerationError(f"input_ids must hold integer token ids; got {ids.dtype}")
    B, T = ids.shape
    if T == 0:
        raise GenerationError("input_ids is empty: give at least one prompt token")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.reshape(B, -1)
    if mask.shape != ids.shape:
        raise GenerationError(f"attention_mask {list(mask.shape)} must match input_ids {list(ids.shape)}")
    real = mask.bool()
    if bool((real[:, :-1] & ~real[:, 1:]).any()):
        row = int((real[:, :-1] & ~real[:, 1:]).any(1).nonzero()[0])
        raise GenerationError(f"attention_mask row {row} has padding after a real token (right padding); "
                              f"generate needs left padding (tokenizer.padding_side = 'left')")
    if not bool(real[:, -1].all()):
        raise GenerationError("attention_mask: a row has no real token at its end (an all-padding prompt)")
    if low.mask is None and not bool(real.all()):
        raise GenerationError("the model was traced without an attention mask, so it cannot take padded "
                              "prompts")
    limit = (getattr(io, "max_positions", None) or {}).get(low.tokens)
    if limit is not None and T + max_new_tokens > limit:
        raise GenerationError(f"{T} prompt tokens + {max_new_tokens} new ones exceed the model's {limit} "
                              f"positions")
    defaults = getattr(getattr(io, "model", None), "generation_config", None)   # transformers' defaults
    if eos_token_id is None:
        eos_token_id = getattr(defaults, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(defaults, "pad_token_id", None)
    eos = _ids_list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    mask_dtype = mask.dtype

    def feed(tokens, valid, position_ids, *extra):
        return [*_inputs(low, tokens, valid.to(mask_dtype), position_ids), *extra]

    position_ids = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = low.prefill_last(*feed(ids, mask, position_ids))
    t1 = time.perf_counter()
    logits = _logits(low, io, out)
    L = T + max_new_tokens
    state = low.start(list(out[low.n_outputs:]), L)
    key_valid = torch.zeros(B, L, dtype=torch.bool, device=ids.device)
    key_valid[:, :T] = real
    unfinished = torch.ones(B, dtype=torch.bool, device=ids.device)
    stats = {} if stats is None else stats
    stats.update({"prefill_s": t1 - t0, "decode_s": 0.0, "decode_steps": 0, "state_bytes": state_bytes(state),
                  "prompt_tokens": T, "new_tokens": 0})
    pos = position_ids[:, -1:]
    valid = None if low.kv_only and bool(real.all()) else key_valid     # no padding: no mask to apply
    for i in range(max_new_tokens):
        nxt = _pick(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        stats["new_tokens"] += 1
        yield nxt
        if eos:
            unfinished &= ~torch.isin(nxt, torch.tensor(eos, device=nxt.device))
        if i == max_new_tokens - 1 or not bool(unfinished.any()):
            break
        t2 = time.perf_counter()
        slot = T + i
        key_valid[:, slot] = True
        pos = pos + 1
        with torch.no_grad():
            step = feed(nxt[:, None], torch.ones(B, 1, dtype=torch.bool, device=ids.device), pos,
                        torch.tensor([slot], device=ids.device), valid, *state)
            out = decode(*step)
        logits = _logits(low, io, out)
        state = list(out[low.n_outputs:])
        dt = time.perf_counter() - t2
        if compile and i == 0:                  # the first compiled step compiles (or finds the cache)
            stats["compile_s"] = dt
        else:
            stats["decode_s"] += dt
            stats["decode_steps"] += 1
        stats["state_bytes"] = state_bytes(state)


@torch.no_grad()
def teacher_forced(low: Lowered, io, batch: dict, prefix: int) -> torch.Tensor:
    """The main output [B, T, V] of the lowered model on `batch` as generation computes it: the
    first `prefix` tokens prefilled, then one decode step per later token fed the batch's own token
    (teacher forcing), a padded step (its mask 0) adding nothing. Equal to the full-sequence output
    to float rounding for exact decode forms; block routing's step selects its own key blocks."""
    ids = batch[low.tokens]
    B, T = ids.shape
    mask = batch[low.mask] if low.mask is not None else torch.ones_like(ids)
    real = mask.bool()
    pos = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)

    def feed(sl: slice) -> list:
        return _inputs(low, ids[:, sl], mask[:, sl], pos[:, sl])

    out = low.prefill(*feed(slice(0, prefix)))
    logits = [_logits(low, io, out)]
    state = low.start(list(out[low.n_outputs:]), T)
    key_valid = torch.zeros(B, T, dtype=torch.bool, device=ids.device)
    key_valid[:, :prefix] = real[:, :prefix]
    for s in range(prefix, T):
        key_valid[:, s] = real[:, s]
        out = low.decode_inplace(*feed(slice(s, s + 1)), torch.tensor([s], device=ids.device), key_valid,
                                 *state)
        logits.append(_logits(low, io, out))
        state = list(out[low.n_outputs:])
    return torch.cat(logits, 1)


def decoded_runner(sites, share: float):
    """A gate runner (rewriter.gate.run's signature) computing each batch's output by
    `teacher_forced`, with `share` of its tokens prefilled; the graph is lowered once per call."""
    def run(gm, batches: list[dict], io, reduce=None) -> list[torch.Tensor]:
        try:
            low = lower_for_generation(gm, list(sites), mask_inputs=io.mask_inputs())
        except LoweringError as e:
            raise GenerationError(f"the gate judges decoding (gate.decode), and this graph cannot be "
                                  f"lowered: {e}") from None
        out = []
        for b in batches:
            T = b[low.tokens].shape[1]
            y = teacher_forced(low, io, b, prefill_length(T, share))
            out.append(y if reduce is None else reduce(b, y))
        return out
    return run
