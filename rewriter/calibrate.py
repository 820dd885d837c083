"""Calibration inputs as the engine sees them: batches of model kwargs, a disjoint held-out set,
and optional validation batches.

Rules that fit weights (MASA's whitened residual, agent/linear attention transfer, LLM-Drop's
importance scores) read ``Calibration.batches``; the gate judges each rewrite on
``Calibration.gate_batches`` — the ``validation`` samples when asked for (drawn like the
calibration samples but never fitted on, so a fit that only memorized its data is caught),
else the calibration batches themselves; the final check reads ``Calibration.heldout``.

Each batch may carry a label, the kind of text and the length it was drawn at (``("pydoc", 1024)``),
or a list of labels, one per row, when it holds several kinds side by side (parallel lists
``batch_labels``, ``validation_labels``, ``heldout_labels``): the gate and the final check measure
their metric per label, and the worst label decides (``rewriter.gate.Gate``).
Unlabelled batches form one group named after the source.

The engine never builds one: the sources (bundled text, pydoc, text files, digits images, a
model's ``inputs_fn``) live with the models, in ``make_calibration`` (models/calibration.py),
and a user may hand ``optimize`` a ``Calibration`` of their own batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Calibration", "row_labels", "register_text", "text_sources"]

_TEXT: dict[str, tuple[str, ...]] = {}


def register_text(name: str, kinds: tuple[str, ...] = ()) -> None:
    """Make `name` a value a recipe's `calibration.text` accepts. `kinds`: the sources a mix stands
    for (each judged on its own); a plain source is one kind, itself. models/text.py registers the
    built-in sources; a plug-in registers its own from a module named in the `rewriter.text`
    entry-point group (the way rules register in `rewriter.rules`)."""
    _TEXT[name] = tuple(kinds) or (name,)


def text_sources() -> dict[str, tuple[str, ...]]:
    """{name: the kinds of text it stands for} of every registered calibration text source."""
    from .rule import load_plugins
    load_plugins("rewriter.text")
    return dict(_TEXT)


def row_labels(label, rows: int) -> list[tuple[str, int]]:
    """The label of each of a batch's `rows` rows: a batch's label is one (text, tokens), or a list
    with one per row."""
    return [tuple(label)] * rows if isinstance(label[0], str) else [tuple(x) for x in label]


@dataclass
class Calibration:
    batches: list[dict]     # model kwargs, each a batch
    heldout: list[dict]     # disjoint from batches
    source: str             # "bundled", "pydoc", a file path, "digits" (vision) or "inputs_fn"
    samples: int            # number of calibration samples (rows over all batches)
    seq_len: int            # maximum tokens per sample (vision: patches + CLS)
    heldout_samples: int = 0
    kind: str = ""
    notes: list[str] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)   # drawn with batches, never fitted on
    batch_labels: list = field(default_factory=list)   # per batch (kind of text, tokens), or one per row
    validation_labels: list = field(default_factory=list)
    heldout_labels: list = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)   # the lengths drawn (and judged) at

    @property
    def gate_batches(self) -> list[dict]:
        """What the per-rewrite gate judges on: the validation batches, else the calibration ones."""
        return self.validation or self.batches

    @property
    def gate_labels(self) -> list:
        """The labels of ``gate_batches`` (empty when unlabelled)."""
        return self.validation_labels if self.validation else self.batch_labels

    @property
    def gate_set(self) -> str:
        """Which samples the gate judges on, in words."""
        return "validation samples (never fitted on)" if self.validation else "calibration samples"
