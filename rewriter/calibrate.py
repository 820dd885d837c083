"""Calibration inputs: batches of model kwargs built from real text (or images), plus a
held-out set that never shares text with them.

Rules that fit weights (MASA's whitened residual, agent/linear attention transfer, LLM-Drop's
importance scores) read ``Calibration.batches``; the gate's final check reads
``Calibration.heldout``. The sample count follows LLM-Drop's recipe of one forward pass over a
fixed calibration set (He et al., "What Matters in Transformers? Not All Attention is Needed",
arXiv:2406.15786, 256 x 2048 tokens of C4); the defaults here are smaller for CPU runs.

- Encoders: one sentence or paragraph per sample, truncated to ``seq_len`` tokens and padded
  to the longest sample of its batch, so the batches carry real padding.
- Causal LMs: contiguous chunks of exactly ``seq_len`` tokens of running text.
- Vision: scikit-learn's digits, resized to the model's image size and normalized.

Held-out text is fixed by ``rewriter.models.split_heldout`` (every fifth unit) before any
seed is applied. When the calibration part is too small for ``samples``, it is repeated
(reshuffled per pass) and the repetition is recorded in ``Calibration.notes`` and warned.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import torch

from rewriter.models import Loaded, digit_indices, digits_pixel_values, load_source, token_chunks

__all__ = ["Calibration", "make_calibration"]


@dataclass
class Calibration:
    batches: list[dict]     # model kwargs, each a batch
    heldout: list[dict]     # disjoint from batches
    source: str             # "bundled", "pydoc", a file path, or "digits" (vision)
    samples: int            # number of calibration samples (rows over all batches)
    seq_len: int            # maximum tokens per sample (vision: patches + CLS)
    heldout_samples: int = 0
    kind: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        """Real (non-padding) calibration tokens; vision: samples x seq_len."""
        if self.batches and "attention_mask" in self.batches[0]:
            return int(sum(b["attention_mask"].sum() for b in self.batches))
        return self.samples * self.seq_len


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
          heldout: bool = False) -> list:
    """n items drawn from `pool` (cycled when it is short, with a note saying so); the held-out draw
    has its own random stream so it never depends on the calibration draw."""
    picked, passes = _cycled(pool, n, random.Random(f"heldout-{seed}" if heldout else seed))
    if passes > 1:
        have = f"only {len(pool)} exist" if heldout else f"only {len(pool)} calibration {unit} exist"
        _note(notes, f"{source}: {n} {'held-out ' if heldout else ''}{unit} requested but {have}; "
                     f"repeating them ({passes} passes)")
    return picked


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
                     batch_size: int = 8, heldout: int = 16, seed: int = 0) -> Calibration:
    """Build calibration batches and disjoint held-out batches for ``loaded``.

    ``text`` is "bundled", "pydoc", a ``.txt`` path or a ``.jsonl`` path (vision models use
    the digits images and accept "bundled" or "digits"). ``seed`` picks and orders the
    calibration samples; it never moves text across the held-out boundary."""
    for key, value, low in (("samples", samples, 1), ("seq_len", seq_len, 1),
                            ("batch_size", batch_size, 1), ("heldout", heldout, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_calibration: {key} must be an integer >= {low}, got {value!r}")
    name, kind, notes = loaded.name, loaded.kind, []
    if kind == "vision":
        return _vision(loaded, text, samples, batch_size, heldout, seed, notes)
    if kind == "generic":
        if loaded.inputs_fn is None:
            raise ValueError(f"make_calibration: model {name!r} is 'generic' with no tokenizer or "
                             f"inputs_fn; return a Loaded with a kind and tokenizer (or an "
                             f"inputs_fn) from its loader")
        _note(notes, f"{name}: 'generic' model calibrated on inputs_fn samples, not on text")
        sizes = [len(b) for b in _batched(list(range(samples)), batch_size)]
        held_sizes = [len(b) for b in _batched(list(range(heldout)), batch_size)]
        seeds = [seed * 100_003 + i for i in range(len(sizes) + len(held_sizes))]
        return Calibration([loaded.inputs_fn(s, seq_len, k) for s, k in zip(sizes, seeds)],
                           [loaded.inputs_fn(s, seq_len, k)
                            for s, k in zip(held_sizes, seeds[len(sizes):])],
                           "inputs_fn", samples, seq_len, heldout, kind, notes)
    loaded.check_text_inputs(seq_len)
    src = load_source(text)
    if kind == "encoder":
        cal_pool, held_pool = src.samples, src.heldout_samples
        if heldout and not held_pool:
            raise ValueError(f"make_calibration: {src.name} has no held-out samples")
        picked = _draw(cal_pool, samples, seed, notes, source=src.name, unit="samples")
        held = _draw(held_pool, heldout, seed, notes, source=src.name, unit="samples", heldout=True)
        batches = [_encode_encoder(loaded, b, seq_len) for b in _batched(picked, batch_size)]
        held_batches = [_encode_encoder(loaded, b, seq_len) for b in _batched(held, batch_size)]
    else:                                                   # causal_lm
        ids, passes = token_chunks(loaded.tokenizer, src.documents, samples, seq_len,
                                   random.Random(seed))
        if passes > 1:
            _note(notes, f"{src.name}: {samples} x {seq_len} tokens requested but the calibration "
                         f"text is shorter; repeating it ({passes} passes)")
        batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)}
                   for c in ids.split(batch_size)]
        held_batches = []
        if heldout:
            held_ids, held_passes = token_chunks(loaded.tokenizer, src.heldout_documents, heldout,
                                                 seq_len, random.Random(f"heldout-{seed}"))
            if held_passes > 1:
                _note(notes, f"{src.name}: {heldout} x {seq_len} held-out tokens requested but the "
                             f"held-out text is shorter; repeating it ({held_passes} passes)")
            held_batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)}
                            for c in held_ids.split(batch_size)]
    return Calibration(batches, held_batches, src.name, samples, seq_len, heldout, kind, notes)


def _vision(loaded: Loaded, text: str, samples: int, batch_size: int, heldout: int, seed: int,
            notes: list[str]) -> Calibration:
    if text not in ("bundled", "digits"):
        raise ValueError(f"make_calibration: {loaded.name!r} is a vision model; calibration text "
                         f"{text!r} does not apply (use 'bundled' or 'digits' for the bundled "
                         f"scikit-learn digits images)")
    cal_pool, held_pool = digit_indices()
    picked = _draw(cal_pool, samples, seed, notes, source="digits", unit="images")
    held = _draw(held_pool, heldout, seed, notes, source="digits", unit="images", heldout=True)

    def pixels(idx: list[int]) -> dict:
        return {"pixel_values": digits_pixel_values(idx, loaded.image_size, loaded.num_channels,
                                                    loaded.image_mean, loaded.image_std)}
    return Calibration([pixels(b) for b in _batched(picked, batch_size)],
                       [pixels(b) for b in _batched(held, batch_size)], "digits", samples,
                       loaded.max_length, heldout, "vision", notes)
