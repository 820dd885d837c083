"""What a module takes and what kind of model it is, read from its ``forward()`` signature and its
config, never from its class name or a list of model types.

``infer_kind(model)`` (the kind picks the default gate and how calibration inputs are made):

- an encoder-decoder (``config.is_encoder_decoder``, or a forward that takes ``decoder_input_ids``):
  ``"generic"`` (relative RMS of the main output);
- main input ``pixel_values`` and a config with ``image_size``: ``"vision"``;
- main input ``input_values`` / ``input_features`` (audio): ``"generic"``;
- main input ``input_ids`` of a model that generates (Hugging Face ``can_generate()``: it has a
  next-token head): ``"causal_lm"``;
- main input ``input_ids`` of a causal model without such a head (``LlamaModel``, ``GPT2Model``: a
  decoder's hidden states; ``is_causal`` finds it from what the model computes): ``"generic"``,
  gated on its hidden states (relative RMS) and calibrated on running text (``text_inputs``);
- any other ``input_ids`` model with a ``vocab_size``: ``"encoder"`` (its main output is per-token
  states or per-sample scores);
- anything else: ``"generic"``.

``text_inputs(model, kind)`` says how text becomes the model's inputs: ``"sentences"`` (encoders:
one sentence or paragraph per row, padded), ``"stream"`` (causal models, with or without a head:
contiguous chunks of running text), ``"seq2seq"`` (encoder-decoders that take ``input_ids``: a
sentence per row into the encoder and, as ``decoder_input_ids``, the same tokens shifted right
after the decoder start token, as BART's forward builds them when none are given and as generate
starts), or None (images, audio, modules without a config).

``config_inputs(model, kind)`` builds seeded example inputs from the same facts: token ids below
the vocabulary size (a padded last row where attention is bidirectional), ``decoder_input_ids``
starting with the decoder start token (the pad id only as the padded row's padding),
``input_values`` long enough for ``seq_len`` frames after the feature convolutions
(``conv_kernel`` / ``conv_stride``), ``input_features`` of ``num_mel_bins`` by
``max_source_positions`` times the convolutions' stride (Radford et al., "Whisper",
arXiv:2212.04356, reads fixed 30 s windows). Vision models get images of ``image_size`` from the
calibration module instead. ``bind_batch(model, item)`` names the positional inputs of one batch
(a tuple from a DataLoader) after the forward parameters.
"""
from __future__ import annotations

import inspect
import math
import weakref
from typing import Callable

import torch

__all__ = ["forward_params", "main_input", "infer_kind", "config_inputs", "bind_batch", "text_config",
           "is_causal", "text_inputs", "TEXT_INPUTS"]

TEXT_INPUTS = ("sentences", "stream", "seq2seq")

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


def _seq2seq(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False)) or \
        "decoder_input_ids" in forward_params(model)


def infer_kind(model: torch.nn.Module) -> str:
    """``"encoder"``, ``"causal_lm"``, ``"vision"`` or ``"generic"`` (see the module doc)."""
    cfg, main = getattr(model, "config", None), main_input(model)
    if _seq2seq(model):
        return "generic"
    if main == "pixel_values" and getattr(cfg, "image_size", None) is not None:
        return "vision"
    if main in _AUDIO_INPUTS:
        return "generic"
    if main == "input_ids":
        if _generates(model):
            return "causal_lm"
        if getattr(text_config(cfg), "vocab_size", None):
            return "generic" if is_causal(model) else "encoder"
    return "generic"


def text_inputs(model: torch.nn.Module, kind: str) -> str | None:
    """How text becomes ``model``'s inputs (one of ``TEXT_INPUTS``, or None: see the module doc)."""
    if kind == "encoder":
        return "sentences"
    if kind == "causal_lm":
        return "stream"
    cfg = getattr(model, "config", None)
    if kind != "generic" or main_input(model) != "input_ids" or \
            not getattr(text_config(cfg), "vocab_size", None):
        return None
    if _seq2seq(model):
        return "seq2seq" if "decoder_input_ids" in forward_params(model) else None
    return "stream" if is_causal(model) else None


_CAUSAL: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
_PROBE_LEN = 8


def is_causal(model: torch.nn.Module) -> bool:
    """Whether a token model's per-token outputs never depend on later tokens (causal attention),
    found from what it computes, not from its class: two seeded rows of ``_PROBE_LEN`` ids (fewer
    where the position table is shorter) below the vocabulary size, differing only in the last
    token, give the same main output at every earlier position and a different one at the last.
    The model runs once, on those 2 rows, in eval mode under no_grad, every submodule put back in the
    mode it was in; a model the probe cannot run (or whose output is not per token) is not causal.
    Remembered per model object."""
    if model in _CAUSAL:
        return _CAUSAL[model]
    vocab = getattr(text_config(getattr(model, "config", None)), "vocab_size", None)
    if main_input(model) != "input_ids" or not vocab:
        return False
    from .zoo import main_output                   # a cycle at import time otherwise
    g = torch.Generator().manual_seed(0)
    top = max(2, min(int(vocab), 1000))
    limit = getattr(text_config(getattr(model, "config", None)), "max_position_embeddings", None)
    length = min(_PROBE_LEN, limit) if isinstance(limit, int) and limit >= 2 else _PROBE_LEN
    ids = torch.randint(0, top, (1, length), generator=g).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % top
    param = next(model.parameters(), None)
    kwargs = {"input_ids": ids.to(param.device) if param is not None else ids}
    if "attention_mask" in forward_params(model):
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            y = main_output(model(**kwargs)).float()
    except Exception:                            # noqa: BLE001 - user code: not provably causal
        y = None
    finally:
        for m, mode in modes:
            m.training = mode
    causal = False
    if y is not None and y.dim() >= 3 and y.shape[:2] == ids.shape:
        tol = 1e-5 * (y.abs().max().item() + 1)
        earlier = (y[0, :-1] - y[1, :-1]).abs().max().item()
        last = (y[0, -1] - y[1, -1]).abs().max().item()
        causal = earlier <= tol < last
    _CAUSAL[model] = causal
    return causal


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
    pad = getattr(tcfg, "pad_token_id", None)

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
        if seq2seq:             # no pad id among the decoder's tokens but its own padding, as the encoder's
            dec = ids(g, batch, min(seq_len, target) if target else seq_len)
            if pad is not None:
                dec[dec == pad] = (pad + 1) % max(2, min(int(vocab or 2), 1000))
                if padded and batch > 1 and main == "input_ids":
                    dec[-1, max(1, seq_len // 2) + 1:] = pad
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
