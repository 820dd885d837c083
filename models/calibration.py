"""Calibration sources: batches of model kwargs built from real text (or images), plus a
held-out set that never shares text with them (``make_calibration`` returns a
``rewriter.calibrate.Calibration``).

Rules that fit weights (MASA's whitened residual, agent/linear attention transfer, LLM-Drop's
importance scores) read ``Calibration.batches``; the gate judges each rewrite on
``Calibration.gate_batches`` — the ``validation`` samples when asked for (drawn like the
calibration samples but never fitted on, so a fit that only memorized its data is caught),
else the calibration batches themselves; the final check reads ``Calibration.heldout``. The
sample count follows LLM-Drop's recipe of one forward pass over a fixed calibration set
(He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786,
256 x 2048 tokens of C4); the defaults here are smaller for CPU runs.

- Encoders: one sentence or paragraph per sample, truncated to ``seq_len`` tokens and padded
  to the longest sample of its batch, so the batches carry real padding.
- Causal LMs: contiguous chunks of exactly ``seq_len`` tokens of running text.
- Vision: scikit-learn's digits, resized to the model's image size and normalized.
- Generic models: ``Loaded.inputs_fn`` samples, each batch with its own seed.

Held-out text is fixed by ``rewriter.models.split_heldout`` (every fifth unit) before any
seed is applied. When the calibration part is too small for ``samples``, it is repeated
(reshuffled per pass) and the repetition is recorded in ``Calibration.notes`` and warned.
"""
from __future__ import annotations

import random
import warnings

import torch

from rewriter.calibrate import Calibration

from .images import digit_indices, digits_pixel_values
from .text import load_source
from .zoo import Loaded, token_chunks

__all__ = ["make_calibration"]


def _cycled(pool: list, n: int, rng: random.Random) -> tuple[list, int]:
    """``n`` items drawn without replacement from ``pool`` in shuffled passes; and the passes."""
    out, passes = [], 0
    while len(out) < n:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[:n - len(out)])
        passes += 1
    return out, passes


def _draw(pool: list, n: int, seed: int, notes: list, *, source: str, unit: str,
          heldout: bool = False, validation: int = 0) -> list:
    """n items drawn from `pool` (cycled when it is short, with a note saying so); the held-out draw
    has its own random stream so it never depends on the calibration draw."""
    picked, passes = _cycled(pool, n, random.Random(f"heldout-{seed}" if heldout else seed))
    if passes > 1:
        have = f"only {len(pool)} exist" if heldout else f"only {len(pool)} calibration {unit} exist"
        _note(notes, f"{source}: {n} {'held-out ' if heldout else ''}{unit} requested but {have}; "
                     f"repeating them ({passes} passes){_VALIDATION_REPEATS if validation else ''}")
    return picked


_VALIDATION_REPEATS = ("; the validation samples repeat calibration ones, so the gate no longer judges "
                       "on unseen data (ask for fewer, or use a longer text such as 'pydoc')")


def _batched(items: list, batch_size: int) -> list[list]:
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)]


def _encode_encoder(loaded: Loaded, texts: list[str], seq_len: int) -> dict:
    enc = loaded.tokenizer(texts, padding="longest", truncation=True, max_length=seq_len,
                           return_tensors="pt")
    return loaded.accepted({k: v for k, v in enc.items()})


def _note(notes: list[str], msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, stacklevel=3)


def make_calibration(loaded: Loaded, text: str = "bundled", samples: int = 64, seq_len: int = 128,
                     batch_size: int = 8, heldout: int = 16, seed: int = 0,
                     validation: int = 0) -> Calibration:
    """Build calibration batches and disjoint held-out batches for ``loaded``.

    ``text`` is "bundled", "pydoc", a ``.txt`` path or a ``.jsonl`` path (vision models use
    the digits images and accept "bundled" or "digits"). ``seed`` picks and orders the
    calibration samples; it never moves text across the held-out boundary. ``validation`` more
    samples are drawn from the calibration side (disjoint from the ``samples`` unless the text
    is too short, which is noted) and kept out of ``batches`` for the gate."""
    for key, value, low in (("samples", samples, 1), ("seq_len", seq_len, 1),
                            ("batch_size", batch_size, 1), ("heldout", heldout, 0),
                            ("validation", validation, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_calibration: {key} must be an integer >= {low}, got {value!r}")
    name, kind, notes = loaded.name, loaded.kind, []
    if kind == "vision":
        return _vision(loaded, text, samples, batch_size, heldout, seed, notes, validation)
    if kind == "generic":
        if loaded.inputs_fn is None:
            raise ValueError(f"make_calibration: model {name!r} is 'generic' with no tokenizer or "
                             f"inputs_fn; return a Loaded with a kind and tokenizer (or an "
                             f"inputs_fn) from its loader")
        _note(notes, f"{name}: 'generic' model calibrated on inputs_fn samples, not on text")
        parts = [[len(b) for b in _batched(list(range(n)), batch_size)] for n in (samples, heldout, validation)]
        seeds = iter(range(seed * 100_003, seed * 100_003 + sum(map(len, parts))))
        made = [[loaded.inputs_fn(size, seq_len, next(seeds)) for size in sizes] for sizes in parts]
        return Calibration(made[0], made[1], "inputs_fn", samples, seq_len, heldout, kind, notes, made[2])
    loaded.check_text_inputs(seq_len)
    src = load_source(text)
    if kind == "encoder":
        cal_pool, held_pool = src.samples, src.heldout_samples
        if heldout and not held_pool:
            raise ValueError(f"make_calibration: {src.name} has no held-out samples")
        picked = _draw(cal_pool, samples + validation, seed, notes, source=src.name, unit="samples",
                       validation=validation)
        held = _draw(held_pool, heldout, seed, notes, source=src.name, unit="samples", heldout=True)
        batches, val_batches, held_batches = (
            [_encode_encoder(loaded, b, seq_len) for b in _batched(part, batch_size)]
            for part in (picked[:samples], picked[samples:], held))
    else:                                                   # causal_lm
        ids, passes = token_chunks(loaded.tokenizer, src.documents, samples + validation, seq_len,
                                   random.Random(seed))
        if passes > 1:
            _note(notes, f"{src.name}: {samples + validation} x {seq_len} tokens requested but the "
                         f"calibration text is shorter; repeating it ({passes} passes)"
                         f"{_VALIDATION_REPEATS if validation else ''}")
        batches, val_batches = ([{"input_ids": c, "attention_mask": torch.ones_like(c)}
                                 for c in part.split(batch_size) if len(c)] for part in (ids[:samples], ids[samples:]))
        held_batches = []
        if heldout:
            held_ids, held_passes = token_chunks(loaded.tokenizer, src.heldout_documents, heldout,
                                                 seq_len, random.Random(f"heldout-{seed}"))
            if held_passes > 1:
                _note(notes, f"{src.name}: {heldout} x {seq_len} held-out tokens requested but the "
                             f"held-out text is shorter; repeating it ({held_passes} passes)")
            held_batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)}
                            for c in held_ids.split(batch_size)]
    return Calibration(batches, held_batches, src.name, samples, seq_len, heldout, kind, notes, val_batches)


def _vision(loaded: Loaded, text: str, samples: int, batch_size: int, heldout: int, seed: int,
            notes: list[str], validation: int) -> Calibration:
    if text not in ("bundled", "digits"):
        raise ValueError(f"make_calibration: {loaded.name!r} is a vision model; calibration text "
                         f"{text!r} does not apply (use 'bundled' or 'digits' for the bundled "
                         f"scikit-learn digits images)")
    cal_pool, held_pool = digit_indices()
    picked = _draw(cal_pool, samples + validation, seed, notes, source="digits", unit="images",
                   validation=validation)
    held = _draw(held_pool, heldout, seed, notes, source="digits", unit="images", heldout=True)

    def pixels(idx: list[int]) -> dict:
        return {"pixel_values": digits_pixel_values(idx, loaded.image_size, loaded.num_channels,
                                                    loaded.image_mean, loaded.image_std)}
    batches, val, held = ([pixels(b) for b in _batched(part, batch_size)]
                          for part in (picked[:samples], picked[samples:], held))
    return Calibration(batches, held, "digits", samples, loaded.max_length, heldout, "vision", notes, val)
