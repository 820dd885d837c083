"""The model's I/O behind one small protocol: what the engine must know about a model's inputs and
outputs, and nothing about any model library.

The engine (trace, analyze, gate, driver, rules) asks a `ModelIO` which output to judge, which
tokens of a batch are real, what the next-token labels are, which inputs are attention masks and
which input dims are dynamic; it never reads an input or output by a library's name.
`rewriter.models.Loaded` implements it for Hugging Face models, sentence encoders, vision models
and bare modules; `PlainIO` is what the engine assumes of a module nobody described.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelIO(Protocol):
    name: str
    kind: str      # "encoder" | "causal_lm" | "vision" | "generic": picks the default gate

    def main_output(self, out: Any) -> torch.Tensor:
        """The output tensor the gate judges (logits, token embeddings, class scores, ...)."""

    def valid_tokens(self, batch: dict, y: torch.Tensor) -> torch.Tensor:
        """bool [B, T] of the real (non-padding) positions of the [B, T, ...] output `y` of `batch`
        ([B] for a [B, C] output): all True when the batch has no padding."""

    def labels(self, batch: dict) -> torch.Tensor | None:
        """Token ids [B, T] whose next-token prediction the output's logits score, or None."""

    def mask_inputs(self) -> frozenset[str]:
        """Names of the inputs that are attention (padding) masks: a mask built from them is a
        padding mask whatever values the example held."""

    def dynamic_dims(self, x: torch.Tensor) -> dict[int, Any] | None:
        """Which dims of the input tensor `x` vary between calls (e.g. {0: Dim.AUTO, 1: Dim.AUTO})."""

    def prepare_trace(self, module: torch.nn.Module) -> None:
        """Adjust the copy the engine traces (it is never the user's module), e.g. switch off a cache."""

    def offloaded_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """{qualified name: tensor reading it from disk} for the weights of `module` that are meta
        tensors because they were offloaded (rewriter/offload.py); {} when none is."""


class PlainIO:
    """A module nobody described: its first output tensor, no padding, no labels, no mask inputs,
    the batch dim dynamic."""

    def __init__(self, name: str = "model", kind: str = "generic"):
        self.name, self.kind = name, kind

    def main_output(self, out: Any) -> torch.Tensor:
        return first_tensor(out)

    def valid_tokens(self, batch: dict, y: torch.Tensor) -> torch.Tensor:
        return torch.ones(y.shape[:2] if y.dim() >= 3 else y.shape[:1], dtype=torch.bool)

    def labels(self, batch: dict) -> torch.Tensor | None:
        return None

    def mask_inputs(self) -> frozenset[str]:
        return frozenset()

    def dynamic_dims(self, x: torch.Tensor) -> dict[int, Any] | None:
        return {0: torch.export.Dim.AUTO} if x.dim() else None

    def prepare_trace(self, module: torch.nn.Module) -> None:
        return None

    def offloaded_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {}


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a (nested) output: a tensor, or the first in a dict / list / tuple."""
    if isinstance(out, torch.Tensor):
        return out
    items = list(out.values()) if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else None
    for x in items or ():
        if isinstance(x, torch.Tensor):
            return x
        if isinstance(x, (list, tuple, dict)):
            return first_tensor(x)
    raise TypeError(f"cannot find a tensor in model output of type {type(out).__name__}")
