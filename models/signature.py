"""What a module takes and what kind of model it is, read from its ``forward()`` signature and its
config, never from its class name or a list of model types.

``infer_kind(model)`` (the kind picks the default gate and how calibration inputs are made):

- an encoder-decoder (``config.is_encoder_decoder``, or a forward that takes ``decoder_input_ids``):
  ``"generic"`` (relative RMS of the main output);
- main input ``pixel_values`` and a config with ``image_size``: ``"vision"``;
- main input ``input_values`` / ``input_features`` (audio): ``"generic"``;
- main input ``input_ids`` of a model that generates (Hugging Face ``can_generate()``: it has a
  next-token head): ``"causal_lm"``; any other ``input_ids`` model with a ``vocab_size``:
  ``"encoder"`` (its main output is per-token states or per-sample scores);
- anything else: ``"generic"``.

``config_inputs(model, kind)`` builds seeded example inputs from the same facts: token ids below
the vocabulary size (a padded last row where attention is bidirectional), ``decoder_input_ids``
starting with the decoder start token, ``input_values`` long enough for ``seq_len`` frames after the
feature convolutions (``conv_kernel`` / ``conv_stride``), ``input_features`` of ``num_mel_bins`` by
``max_source_positions`` times the convolutions' stride (Radford et al., "Whisper",
arXiv:2212.04356, reads fixed 30 s windows). Vision models get images of ``image_size`` from the
calibration module instead. ``bind_batch(model, item)`` names the positional inputs of one batch
(a tuple from a DataLoader) after the forward parameters.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

__all__ = ["forward_params", "main_input", "infer_kind", "config_inputs", "bind_batch", "text_config"]

_AUDIO_INPUTS = ("input_values", "input_features")


def forward_params(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    """The named parameters of ``model.forward`` (no ``*args`` / ``**kwargs``), in order."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {n: p for n, p in params.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def main_input(model: torch.nn.Module) -> str | None:
    """The input the model is mainly fed: Hugging Face's ``main_input_name`` where the forward takes
    it, else the first parameter without a default, else the first parameter."""
    params = forward_params(model)
    name = getattr(model, "main_input_name", None)
    if isinstance(name, str) and name in params:
        return name
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    return (required or list(params) or [None])[0]


def text_config(config):
    """The text part of a config (``get_text_config()`` of multimodal configs), else the config."""
    get = getattr(config, "get_text_config", None)
    try:
        return get() if callable(get) else config
    except (TypeError, ValueError, AttributeError):
        return config


def _generates(model: torch.nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except (TypeError, AttributeError):
        return False


def infer_kind(model: torch.nn.Module) -> str:
    """``"encoder"``, ``"causal_lm"``, ``"vision"`` or ``"generic"`` (see the module doc)."""
    params, cfg = forward_params(model), getattr(model, "config", None)
    main = main_input(model)
    if getattr(cfg, "is_encoder_decoder", False) or "decoder_input_ids" in params:
        return "generic"
    if main == "pixel_values" and getattr(cfg, "image_size", None) is not None:
        return "vision"
    if main in _AUDIO_INPUTS:
        return "generic"
    if main == "input_ids":
        if _generates(model):
            return "causal_lm"
        if getattr(text_config(cfg), "vocab_size", None):
            return "encoder"
    return "generic"


def _frames_to_samples(config, frames: int) -> int:
    """Raw audio samples that the feature convolutions (``conv_kernel``, ``conv_stride``) turn into
    ``frames`` frames: each layer inverted, L_in = (L_out - 1) * stride + kernel."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return frames * int(getattr(config, "inputs_to_logits_ratio", 1) or 1)
    n = frames
    for k, s in reversed(list(zip(kernels, strides))):
        n = (n - 1) * s + k
    return n


def _conv_stride(model: torch.nn.Module) -> int:
    """The product of the strides of the model's 1-D convolutions (its feature front end)."""
    return math.prod(m.stride[0] for m in model.modules() if isinstance(m, torch.nn.Conv1d))


def config_inputs(model: torch.nn.Module, kind: str) -> Callable[[int, int, int], dict] | None:
    """``inputs_fn(batch, seq_len, seed) -> dict`` of seeded inputs the forward takes, built from the
    signature and the config; None when neither says what the inputs are (or for vision models,
    which get real images)."""
    params, cfg, main = forward_params(model), getattr(model, "config", None), main_input(model)
    if cfg is None or kind == "vision" or main not in ("input_ids",) + _AUDIO_INPUTS:
        return None
    tcfg = text_config(cfg)
    vocab = getattr(tcfg, "vocab_size", None)
    if main == "input_ids" and not vocab:
        return None
    seq2seq = getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params
    padded = kind != "causal_lm" and "attention_mask" in params
    start = getattr(cfg, "decoder_start_token_id", None)
    if start is None:
        start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
    target = getattr(cfg, "max_target_positions", None)

    def ids(g, batch, length, low=0):
        return torch.randint(low, max(low + 1, min(int(vocab or 2), 1000)), (batch, length), generator=g)

    def make(batch: int, seq_len: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        out = {}
        if main == "input_ids":
            out["input_ids"] = ids(g, batch, seq_len)
        elif main == "input_values":
            out["input_values"] = torch.randn(batch, _frames_to_samples(cfg, seq_len), generator=g)
        else:
            positions = getattr(cfg, "max_source_positions", None)
            frames = (positions or seq_len) * _conv_stride(model)
            out["input_features"] = torch.randn(batch, int(getattr(cfg, "num_mel_bins", 80)), frames,
                                                generator=g)
        if main == "input_ids" and "attention_mask" in params:
            mask = torch.ones_like(out["input_ids"])
            if padded and batch > 1:
                mask[-1, max(1, seq_len // 2):] = 0
            out["attention_mask"] = mask
        if seq2seq:
            dec = ids(g, batch, min(seq_len, target) if target else seq_len)
            if start is not None:
                dec[:, 0] = int(start)
            out["decoder_input_ids"] = dec
        return out
    return make


def bind_batch(model: torch.nn.Module, item, where: str = "batch") -> dict:
    """One calibration batch as forward() keyword arguments: a dict as it is (its keys checked
    against the forward), a tuple / list bound positionally to the forward's parameters, a tensor as
    the first parameter. ValueError names the batch and what the forward takes."""
    params = forward_params(model)
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        sig = None
    takes_kwargs = sig is not None and any(p.kind is inspect.Parameter.VAR_KEYWORD
                                           for p in sig.parameters.values())
    if isinstance(item, torch.Tensor):
        item = (item,)
    if isinstance(item, dict):
        unknown = [k for k in item if k not in params]
        if unknown and not takes_kwargs:
            raise ValueError(f"calibration {where}: {', '.join(map(repr, unknown))} "
                             f"{'is not an input' if len(unknown) == 1 else 'are not inputs'} of "
                             f"{type(model).__name__}.forward (it takes {', '.join(params) or 'nothing'})")
        return dict(item)
    if isinstance(item, (tuple, list)):
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [n for n, p in params.items() if p.kind in kinds]
        if len(item) > len(positional):
            raise ValueError(f"calibration {where}: {len(item)} positional inputs, but "
                             f"{type(model).__name__}.forward takes {len(positional)} "
                             f"({', '.join(positional) or 'none'}); pass a dict of named inputs instead")
        return dict(zip(positional, item))
    raise ValueError(f"calibration {where}: expected a dict of named inputs, a tuple of positional "
                     f"inputs or a tensor, got {type(item).__name__}")
