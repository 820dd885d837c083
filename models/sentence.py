"""sentence-transformers models in and out (Reimers & Gurevych, "Sentence-BERT", arXiv:1908.10084).

A ``SentenceTransformer`` is a sequence of modules: a ``Transformer`` (a Hugging Face model and its
tokenizer), then pooling, normalization, dense layers... Only the Hugging Face model has attention,
so ``sentence_loaded`` hands the optimizer that model (kind from its signature, the
SentenceTransformer's tokenizer and ``max_seq_length``), and ``sentence_result`` gives back a copy
of the SentenceTransformer whose Transformer module runs the optimized graph instead
(``OptimizedEncoder``); every other module is the user's, untouched, so ``.encode()`` works as
before. The optimized model is ``result[i].auto_model.optimized`` (``.save()`` it; the
SentenceTransformer's own ``save`` would need the Hugging Face weights, which the graph replaced).

sentence-transformers is imported only when the user already has: an object is a
SentenceTransformer only if that package is loaded.
"""
from __future__ import annotations

import copy
import sys

import torch

from .zoo import Loaded, wrap_module

__all__ = ["is_sentence_transformer", "sentence_loaded", "sentence_result", "OptimizedEncoder"]


def is_sentence_transformer(obj) -> bool:
    st = sys.modules.get("sentence_transformers")
    cls = getattr(st, "SentenceTransformer", None) if st is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


def _transformer_index(st) -> int:
    """The position of the module holding the Hugging Face model (``auto_model``)."""
    for i, module in enumerate(st):
        if isinstance(getattr(module, "auto_model", None), torch.nn.Module):
            return i
    raise ValueError(f"{type(st).__name__}: none of its modules ({', '.join(type(m).__name__ for m in st)}) "
                     f"holds a Hugging Face model (auto_model) with attention to optimize")


def sentence_loaded(st, tokenizer=None) -> Loaded:
    """The SentenceTransformer's Hugging Face model as the optimizer's Loaded: its kind and inputs from
    its signature and config, the SentenceTransformer's tokenizer (or ``tokenizer``), and the
    SentenceTransformer's ``max_seq_length`` as the longest calibration input."""
    module = st[_transformer_index(st)]
    hf = module.auto_model
    tok = tokenizer if tokenizer is not None else getattr(module, "tokenizer", None)
    name = getattr(getattr(hf, "config", None), "name_or_path", "") or type(hf).__name__
    loaded = wrap_module(hf, tokenizer=tok, name=f"SentenceTransformer({name})")
    limit = getattr(st, "max_seq_length", None)
    if isinstance(limit, int) and 0 < limit < loaded.max_length:
        loaded.max_length = limit
    loaded.description = f"{type(hf).__name__} inside a SentenceTransformer ({len(st)} modules)"
    return loaded


class OptimizedEncoder(torch.nn.Module):
    """Stands in for the Hugging Face model inside a sentence-transformers ``Transformer`` module:
    takes the keyword inputs that module passes and returns the optimized graph's output (the same
    output type as the model's). ``config`` is the model's, which the module reads."""

    def __init__(self, optimized: torch.nn.Module, config, main_input_name: str = "input_ids"):
        super().__init__()
        self.optimized = optimized
        self.config = config
        self.main_input_name = main_input_name

    def forward(self, **inputs):
        flags = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor) and v is not None}
        flags.pop("return_dict", None)      # the module always asks for a ModelOutput, as traced
        if any(flags.values()):
            raise ValueError(f"the optimized model was traced with its default options; "
                             f"{', '.join(f'{k}={v!r}' for k, v in flags.items() if v)} cannot change them")
        return self.optimized(**{k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})

    def save_pretrained(self, *args, **kwargs):
        raise NotImplementedError("an optimized SentenceTransformer has no Hugging Face weights to save; "
                                  "save the optimized model with st[0].auto_model.optimized.save(path) and "
                                  "rebuild it with rewriter.load(path)")


def sentence_result(st, optimized: torch.nn.Module):
    """A copy of ``st`` whose Transformer module runs ``optimized``; its other modules (pooling,
    normalization, ...) are copies of the user's, and the user's ``st`` is untouched."""
    i = _transformer_index(st)
    module = st[i]
    hf = module.auto_model
    encoder = OptimizedEncoder(optimized, hf.config, getattr(hf, "main_input_name", "input_ids"))
    out = copy.deepcopy(st, memo={id(hf): encoder})     # the Hugging Face model is not copied: replaced
    target = out[i]
    if target.auto_model is not encoder:       # an older sentence-transformers keeps its own attribute
        setattr(target, "model" if "model" in target._modules else "auto_model", encoder)
    out.report = getattr(optimized, "report", None)
    return out
