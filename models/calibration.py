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

How text becomes samples is ``Loaded.text_inputs`` (``rewriter.models.signature.text_inputs``):

- ``"sentences"`` (encoders): one sentence or paragraph per sample, truncated to ``seq_len`` tokens
  and padded to the longest sample of its batch, so the batches carry real padding.
- ``"stream"`` (causal LMs, and causal decoders without an LM head, kind ``"generic"``): contiguous
  chunks of exactly ``seq_len`` tokens of running text.
- ``"seq2seq"`` (encoder-decoders with a tokenizer, kind ``"generic"``): sentences as for encoders,
  and as ``decoder_input_ids`` the same tokens shifted right after the decoder start token
  (``Loaded.with_decoder_inputs``).
- Vision: scikit-learn's digits, resized to the model's image size and normalized.
- Other generic models (and text models of kind ``"generic"`` without a tokenizer):
  ``Loaded.inputs_fn`` samples, each batch with its own seed.

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
from .signature import bind_batch
from .text import load_source, load_sources, split_heldout
from .zoo import Loaded, encode_documents, token_chunks

__all__ = ["make_calibration", "calibration_from", "evaluation_batches", "padding_tokenizer",
           "judged_lengths"]


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
    enc = padding_tokenizer(loaded.tokenizer)(texts, padding="longest", truncation=True,
                                              max_length=seq_len, return_tensors="pt")
    return loaded.accepted(loaded.with_decoder_inputs({k: v for k, v in enc.items()}))


def padding_tokenizer(tokenizer):
    """``tokenizer``, or where it has no padding token (decoder tokenizers often have none) a copy
    that pads with its end-of-text (else unknown) token; the attention mask marks the padding."""
    if getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer
    filler = getattr(tokenizer, "eos_token", None) or getattr(tokenizer, "unk_token", None)
    if filler is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no padding, end-of-text or unknown "
                         f"token to pad batches of sentences with; set tokenizer.pad_token")
    import copy
    tok = copy.deepcopy(tokenizer)       # a shallow copy shares its special-token table
    tok.pad_token = filler
    return tok


def _note(notes: list[str], msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, stacklevel=3)


JUDGE_FACTOR = 4      # "auto" lengths of a causal LM: seq_len and JUDGE_FACTOR x seq_len (capped)


def judged_lengths(loaded: Loaded, seq_len: int, lengths="auto") -> list[int]:
    """The lengths calibration samples are drawn at and the gate judges at. "auto": a causal LM's
    ``seq_len`` and ``JUDGE_FACTOR`` times it, capped at the model's position limit (longer inputs put
    more weight on what a rewrite approximates, e.g. the linear part of linear attention); other
    kinds ``[seq_len]`` (an encoder's samples are whole sentences or paragraphs, truncated at
    ``seq_len``). A list is used as given, each within 1..the model's max_length."""
    if lengths in (None, "auto"):
        if loaded.text_inputs != "stream" or loaded.tokenizer is None:
            return [seq_len]
        return sorted({seq_len, max(seq_len, min(JUDGE_FACTOR * seq_len, loaded.max_length))})
    if isinstance(lengths, int):
        lengths = [lengths]
    bad = [n for n in lengths if not isinstance(n, int) or isinstance(n, bool) or n < 1]
    if bad or not lengths:
        raise ValueError(f"calibration.lengths must be 'auto' or a list of token counts >= 1, "
                         f"got {lengths!r}")
    over = [n for n in lengths if n > loaded.max_length]
    if over:
        raise ValueError(f"calibration.lengths: {over[0]} exceeds {loaded.name}'s max_length "
                         f"{loaded.max_length}")
    return sorted(set(lengths))


def _cell_counts(total: int, seq_len: int, cells: int, length: int) -> int:
    """Samples of one (kind, length) cell: ``total`` samples of ``seq_len`` tokens spread evenly, as
    tokens, over ``cells`` cells, at least one sample per cell (none when ``total`` is 0)."""
    if total == 0:
        return 0
    return max(1, round(total * seq_len / (cells * length)))


def make_calibration(loaded: Loaded, text: str | list[str] = "auto", samples: int = 64, seq_len: int = 128,
                     batch_size: int = 8, heldout: int = 16, seed: int = 0,
                     validation: int = 0, lengths="auto") -> Calibration:
    """Build calibration batches and disjoint held-out batches for ``loaded``.

    ``text`` is "auto" (running text, ``text_inputs`` "stream": "mix", the four kinds of text of
    ``rewriter.models.text.MIX``; sentences, for encoders and encoder-decoders: "bundled"), a source name ("bundled", "pydoc", "python", "legal", "mix",
    "pydoc+python"), a ``.txt`` path, a ``.jsonl`` path or a list of strings (one sample each;
    vision models use the digits images and accept "auto", "bundled" or "digits"). ``lengths``
    (``judged_lengths``): the token lengths samples are drawn at. The ``samples`` x ``seq_len``
    tokens are spread evenly over every (kind of text, length) cell, at least one sample per cell,
    likewise ``validation`` and ``heldout``; each batch holds one cell (``batch_size`` rows at
    ``seq_len``, proportionally fewer at longer lengths) and carries its label, which the gate judges
    by. ``seed`` picks and orders the calibration samples; it never moves text across the held-out
    boundary. ``validation`` samples are drawn from the calibration side (disjoint from the
    ``samples`` unless the text is too short, which is noted) and kept out of ``batches``."""
    for key, value, low in (("samples", samples, 1), ("seq_len", seq_len, 1),
                            ("batch_size", batch_size, 1), ("heldout", heldout, 0),
                            ("validation", validation, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"make_calibration: {key} must be an integer >= {low}, got {value!r}")
    name, kind, notes = loaded.name, loaded.kind, []
    if kind == "vision":
        return _vision(loaded, "bundled" if text == "auto" else text, samples, batch_size, heldout, seed,
                       notes, validation)
    if kind == "generic" and (loaded.text_inputs is None or loaded.tokenizer is None):
        if loaded.inputs_fn is None:
            raise ValueError(f"make_calibration: model {name!r} is 'generic' with no tokenizer or "
                             f"inputs_fn; pass your own batches, optimize(..., calibration=[batch, ...]) "
                             f"(dicts of named inputs or tuples, e.g. a DataLoader), or return a Loaded "
                             f"with a kind and tokenizer (or an inputs_fn) from its loader")
        _note(notes, f"{name}: 'generic' model calibrated on inputs_fn samples, not on text"
              + (" (it takes text, but no tokenizer is known: pass optimize(..., tokenizer=...))"
                 if loaded.text_inputs is not None else ""))
        parts = [[len(b) for b in _batched(list(range(n)), batch_size)] for n in (samples, heldout, validation)]
        seeds = iter(range(seed * 100_003, seed * 100_003 + sum(map(len, parts))))
        made = [[loaded.inputs_fn(size, seq_len, next(seeds)) for size in sizes] for sizes in parts]
        return Calibration(made[0], made[1], "inputs_fn", samples, seq_len, heldout, kind, notes, made[2])
    loaded.check_text_inputs(seq_len)
    stream = loaded.text_inputs == "stream"
    if text == "auto":
        text = "mix" if stream else "bundled"
    sources, lens = load_sources(text), judged_lengths(loaded, seq_len, lengths)
    cells = [(src, L) for src in sources for L in lens]
    one = len(cells) == 1
    drawn = {"cal": {}, "val": {}, "held": {}}          # part -> length -> [(label, row)]
    encoded: dict = {}                                  # each source's documents, tokenized once
    for src, L in cells:
        n_cal, n_val, n_held = (_cell_counts(c, seq_len, len(cells), L)
                                for c in (samples, validation, heldout))
        # the random stream of a cell (one cell: the seed itself, as before there were cells)
        key = seed if one else f"{seed}-{src.name}-{L}"
        where = src.name if one else f"{src.name} at {L} tokens"
        if not stream:                                      # sentences (+ their shifted decoder inputs)
            cal, held = _encoder_cell(loaded, src, L, seq_len, n_cal + n_val, n_held, key, notes, where, n_val)
        else:                                               # a stream: chunks of exactly L tokens
            if src.name not in encoded:
                encoded[src.name] = [encode_documents(loaded.tokenizer, d)
                                     for d in (src.documents, src.heldout_documents)]
            docs, held_docs = encoded[src.name]
            cal = _token_cell(loaded, docs, n_cal + n_val, L, random.Random(key), notes,
                              f"{where}: {n_cal + n_val} x {L} tokens requested but the calibration text "
                              f"is shorter", n_val)
            held = _token_cell(loaded, held_docs, n_held, L, random.Random(f"heldout-{key}"), notes,
                               f"{where}: {n_held} x {L} held-out tokens requested but the held-out "
                               f"text is shorter") if n_held else []
        for part, rows in (("cal", cal[:n_cal]), ("val", cal[n_cal:]), ("held", held)):
            drawn[part].setdefault(L, []).extend(((src.name, L), r) for r in rows)
    out, labels = {}, {}
    for part, by_length in drawn.items():     # one length per batch, the kinds side by side in it
        out[part], labels[part] = [], []
        for L, rows in by_length.items():
            per = batch_size if L <= seq_len else max(1, batch_size * seq_len // L)
            for chunk in _batched(rows, per):
                row_labels = [lb for lb, _ in chunk]
                if not stream:
                    out[part].append(_encode_encoder(loaded, [r for _, r in chunk], L))
                else:
                    ids = torch.stack([r for _, r in chunk])
                    out[part].append(loaded.accepted({"input_ids": ids,
                                                      "attention_mask": torch.ones_like(ids)}))
                labels[part].append(row_labels[0] if len(set(row_labels)) == 1 else row_labels)
    source = "mix" if text == "mix" else "+".join(s.name for s in sources)
    return Calibration(out["cal"], out["held"], source, samples, seq_len, heldout, kind, notes, out["val"],
                       labels["cal"], labels["val"], labels["held"], lens)


def _token_cell(loaded: Loaded, encoded: list[list[int]], n: int, length: int, rng, notes: list, short: str,
                validation: int = 0) -> torch.Tensor:
    ids, passes = token_chunks(loaded.tokenizer, None, n, length, rng, encoded=encoded)
    if passes > 1:
        _note(notes, f"{short}; repeating it ({passes} passes){_VALIDATION_REPEATS if validation else ''}")
    return ids


def _encoder_cell(loaded: Loaded, src, length: int, seq_len: int, n: int, n_held: int, key, notes: list,
                  where: str, validation: int) -> tuple[list[str], list[str]]:
    """An encoder cell's calibration and held-out samples: units (sentences, paragraphs) as they are
    up to ``seq_len``; at a longer length, consecutive units joined until they fill it."""
    cal_pool, held_pool = src.samples, src.heldout_samples
    if n_held and not held_pool:
        raise ValueError(f"make_calibration: {src.name} has no held-out samples")
    if length > seq_len:
        cal_pool, held_pool = (_packed(loaded.tokenizer, p, length) for p in (cal_pool, held_pool))
    picked = _draw(cal_pool, n, key, notes, source=where, unit="samples", validation=validation)
    held = _draw(held_pool, n_held, key, notes, source=where, unit="samples", heldout=True)
    return picked, held


def _packed(tokenizer, units: list[str], length: int) -> list[str]:
    """``units`` joined in order into texts of at least ``length`` tokens each (the last, shorter
    remainder is kept only when nothing else is)."""
    sizes = [len(x) for x in tokenizer(list(units), add_special_tokens=False, verbose=False)["input_ids"]]
    out, cur, have = [], [], 0
    for u, k in zip(units, sizes):
        cur.append(u)
        have += k
        if have >= length:
            out.append(" ".join(cur))
            cur, have = [], 0
    return out or [" ".join(cur)]


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


def calibration_from(loaded: Loaded, data=None, *, text: str | list[str] = "auto", samples: int = 64,
                     seq_len: int = 128, batch_size: int = 8, heldout: int = 16, seed: int = 0,
                     validation: int = 0, lengths="auto") -> Calibration:
    """The calibration for ``optimize(..., calibration=data)`` under a recipe's calibration section
    (the keyword arguments):

    - None: ``make_calibration`` from ``text`` (the recipe's ``calibration.text``);
    - a ``Calibration``: as it is;
    - a list of strings: one sample each, tokenized with the model's tokenizer and split like a text
      file (every fifth string held out), then drawn as ``make_calibration`` draws;
    - any other iterable (a list, a generator, a ``torch.utils.data.DataLoader``): batches, each a
      dict of named inputs, a tuple of positional inputs (named after the forward's parameters) or a
      tensor. Every fifth batch is held out when ``heldout`` > 0 (of 2-4 batches, the last one), up
      to ``heldout`` samples; ``validation`` samples are taken from the end of the rest (at least one
      batch stays for calibration), and calibration uses the first batches up to ``samples`` samples.
      Batches are kept whole, so the counts are rounded up to whole batches (the notes say how)."""
    spec = dict(samples=samples, seq_len=seq_len, batch_size=batch_size, heldout=heldout, seed=seed,
                validation=validation, lengths=lengths)
    if data is None:
        return make_calibration(loaded, text=text, **spec)
    if isinstance(data, Calibration):
        return data
    if isinstance(data, (str, bytes)) or isinstance(data, dict):
        raise TypeError(f"calibration: expected a Calibration, a list of strings or an iterable of batches "
                        f"(dicts or tuples of inputs, e.g. a DataLoader), got {type(data).__name__}"
                        + ("; name a text file under the recipe's calibration.text instead"
                           if isinstance(data, str) else ""))
    try:
        items = list(data)
    except TypeError:
        raise TypeError(f"calibration: expected a Calibration, a list of strings or an iterable of batches, "
                        f"got {type(data).__name__}") from None
    if not items:
        raise ValueError("calibration: the iterable of batches is empty")
    if all(isinstance(x, str) for x in items):
        if loaded.tokenizer is None:
            raise ValueError(f"calibration: {loaded.name} has no tokenizer to turn the {len(items)} strings "
                             f"into inputs; pass optimize(..., tokenizer=...)")
        return make_calibration(loaded, text=items, **spec)
    batches = [_accepted(loaded, bind_batch(loaded.model, x, where=f"batch {i}"))
               for i, x in enumerate(items)]
    return _split_batches(loaded, batches, samples, heldout, validation)


def _accepted(loaded: Loaded, batch: dict) -> dict:
    """A Hugging Face model's batch without the keys its forward does not take (a DataLoader's
    ``labels``); other modules get their batch as it is."""
    return loaded.accepted(batch) if loaded.config is not None else batch


def _rows(batch: dict) -> int:
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    return int(first.shape[0]) if first is not None else 1


def _take(batches: list[dict], n: int, from_end: bool = False) -> list[dict]:
    """The first (last) batches holding at least ``n`` samples, whole batches."""
    out, got = [], 0
    for b in (reversed(batches) if from_end else batches):
        if got >= n:
            break
        out.append(b)
        got += _rows(b)
    return out[::-1] if from_end else out


def _split_batches(loaded: Loaded, batches: list[dict], samples: int, heldout: int,
                   validation: int) -> Calibration:
    notes: list[str] = []
    cal, held = split_heldout(batches) if heldout else (list(batches), [])
    if heldout and not held:
        _note(notes, f"{loaded.name}: one calibration batch given, so none is held out for the final check")
    held = _take(held, heldout)
    val = _take(cal[1:], validation, from_end=True) if validation else []
    if validation and not val:
        _note(notes, f"{loaded.name}: one calibration batch left, so none is kept for validation")
    cal = _take(cal[:len(cal) - len(val)], samples)
    counts = [sum(map(_rows, part)) for part in (cal, val, held)]
    notes.append(f"{len(batches)} batches given: {len(cal)} for calibration ({counts[0]} samples), "
                 f"{len(val)} for validation ({counts[1]}), {len(held)} held out ({counts[2]}; every fifth)")
    lengths = [int(v.shape[1]) for b in cal for v in b.values()
               if isinstance(v, torch.Tensor) and v.dim() >= 2]
    return Calibration(cal, held, "batches", counts[0], max(lengths, default=1), counts[2], loaded.kind,
                       notes, val)


def evaluation_batches(loaded: Loaded, text: str | list[str], samples: int = 64, seq_len: int = 128,
                       batch_size: int = 8) -> list[dict]:
    """Batches of ``text`` for measuring a model, not for fitting one: every unit of the text, both
    sides of the held-out split, in file order (encoders: up to ``samples`` sentences or paragraphs;
    causal LMs: up to ``samples`` chunks of ``seq_len`` tokens of the running text, fewer when the
    text is shorter, never repeated; encoder-decoders: sentences, as encoders). Models without text
    inputs (vision, audio, modules without a config): ValueError."""
    if loaded.text_inputs is None:
        raise ValueError(f"{loaded.name} is a {loaded.kind!r} model: it takes no text, so it cannot be "
                         f"measured on a text file")
    loaded.check_text_inputs(seq_len)
    src = load_source(text)
    if loaded.text_inputs != "stream":
        units = (src.samples + src.heldout_samples)[:samples]
        return [_encode_encoder(loaded, b, seq_len) for b in _batched(units, batch_size)]
    docs = src.documents + src.heldout_documents
    encoded = encode_documents(loaded.tokenizer, docs)
    stream = sum(len(x) + 1 for x in encoded)
    n = max(1, min(samples, stream // seq_len))
    ids, _ = token_chunks(loaded.tokenizer, None, n, seq_len, encoded=encoded)
    return [loaded.accepted({"input_ids": c, "attention_mask": torch.ones_like(c)})
            for c in ids.split(batch_size)]
