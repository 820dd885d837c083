"""The rule contract and the rule registry.

A rule is data: a name, the paper it implements, whether it is exact, a pydantic model of its
recipe options, and functions that pass values, never state:

    plan(ctx, sites, opts)            -> list[Candidate]   optional; default one per site, graph order
    check(candidate, opts)            -> None to accept, or a sentence saying why not
    build(ctx, candidate, opts)       -> Built(tensors, facts); pure tensor math, the model untouched
    apply(gm, candidate, built, opts) -> None; edits the traced graph through rewriter.graph

A `Candidate` is the unit of decision: one site, or several that one decision rewrites together
(a MASA group). What `plan` found travels in `candidate.facts`, what `build` measured in
`built.facts`; both land in the decision's record. The driver (rewriter/driver.py) owns trial,
run and replay: rules never snapshot, gate, record or roll back. Third-party rules register the
way the built-in ones do: `register(Rule(...))` in a module named by the entry-point group
`rewriter.rules` (pyproject.toml).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .site import AttentionSite


class StepOptions(BaseModel):
    """Options every rule step accepts. Rules subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid")

    layers: str | list[int] | None = Field(
        default=None,
        description='Which sites to target: "all" (default), a range such as "2-5", a comma list "0,3,5", '
        'or a YAML list [0, 3]; "auto" is "all" with order: damage.')
    max_applied: int | None = Field(
        default=None, ge=1, description="Apply at most this many candidates in this step; omitted = as many "
        "as the gate allows.")
    max_layers: int | None = Field(default=None, ge=1, description="Accepted alias of max_applied.")
    order: Literal["plan", "damage"] = Field(
        default="plan", description='"plan": the order the rule plans (graph order unless it ranks); '
        '"damage": each candidate is first built and applied alone on the current model and the relative '
        "RMS change of the model's output measured, then tried least damaging first.")

    patience: int | None = Field(
        default=3, ge=1,
        description="In a ranked step (order: damage, layers: auto, or a rule's own ranking such as "
        "drop_attention's order: importance): stop after this many candidates in a row failed the gate; "
        "the rest rank as more damaging and are recorded as skipped with this reason. null: try every "
        "candidate.")

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, v):
        if isinstance(v, str) and v not in ("all", "auto"):
            if not re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", v):
                raise ValueError(f'layers must be "all", "auto", "A-B", "A,B,C" or a list of ints; got {v!r}')
        return v

    @property
    def limit(self) -> int | None:
        """The per-step cap on applied candidates (max_applied, or its alias max_layers)."""
        return self.max_applied if self.max_applied is not None else self.max_layers

    @property
    def by_damage(self) -> bool:
        return self.order == "damage" or self.layers == "auto"

    @property
    def ranked(self) -> bool:
        """Whether the candidates come least damaging first, so that `patience` applies: the driver's
        `order: damage`, or a rule's own ranking (an `order` other than "plan" or "graph")."""
        return self.by_damage or self.order not in ("plan", "graph")

    def selects(self, site: AttentionSite, sites: list[AttentionSite] = ()) -> bool:
        """Whether `layers` selects this site: matched on site.layer; on site.index only in a model
        where no site (of `sites`) has a layer, so that the two numberings never mix (SigLIP's
        pooling head, in no list of blocks, is not "layer 2" of a 2-layer encoder)."""
        v = self.layers
        if v is None or v in ("all", "auto"):
            return True
        if site.layer is None:
            return not any(s.layer is not None for s in sites) and site.index in parse_layers(v)
        return site.layer in parse_layers(v)


def parse_layers(v: str | list[int]) -> set[int]:
    if isinstance(v, list):
        return set(v)
    out: set[int] = set()
    for part in v.split(","):
        a, _, b = part.strip().partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


@dataclass(frozen=True)
class Candidate:
    """What one decision rewrites: its sites (graph order within a group) and what plan found."""

    sites: tuple[AttentionSite, ...]
    facts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.sites:
            raise ValueError("a Candidate needs at least one site")
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "facts", MappingProxyType(dict(self.facts)))

    @property
    def site(self) -> AttentionSite:
        """The first site: the one whose index names the candidate's tensors and graph nodes."""
        return self.sites[0]

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.sites]


@dataclass(frozen=True)
class Built:
    """What build made: tensors (saved with the model, handed to apply) and facts for the record."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: "Built | dict | None") -> "Built":
        """A Built from what a build returned (a bare dict of tensors is accepted)."""
        if isinstance(value, Built):
            return value
        if value is None or isinstance(value, dict):
            return cls(dict(value or {}))
        raise TypeError(f"build must return Built or a dict of tensors, not {type(value).__name__}")


class Refused(Exception):
    """Raised by a rule's build when what it measured or found rules the candidate out (a refusal
    `check` could not make from the candidate alone): the driver records it as rejected with this
    message, not as an error. `facts` (what was measured) land in the record."""

    def __init__(self, message: str, facts: dict | None = None):
        super().__init__(message)
        self.facts = dict(facts or {})


def one_per_site(ctx, sites: list[AttentionSite], opts) -> list[Candidate]:
    """The default plan: one candidate per selected site, in graph order."""
    return [Candidate((s,)) for s in sites]


@dataclass(frozen=True)
class Rule:
    name: str
    paper: str                     # citation, e.g. 'Men et al., "What Matters in Transformers?", arXiv:2406.15786'
    summary: str                   # one line: what the rewrite does
    exact: bool                    # exact rewrites may skip the gate; approximate ones never do
    options: type[StepOptions]
    check: Callable[[Candidate, Any], str | None]
    build: Callable[[Any, Candidate, Any], Built | dict]
    apply: Callable[[Any, Candidate, Built, Any], None]
    plan: Callable[[Any, list[AttentionSite], Any], list[Candidate]] = one_per_site
    cost: Callable[[AttentionSite, Any], Any] | None = None   # attention FLOPs/token after the rewrite (sympy, in N)
    kind: Literal["attention", "memory", "structure"] = "attention"
    # fits tensors to the calibration data (True, or a function of the options, e.g. agent's calibrate):
    # such steps gate on held-out validation samples by default (recipe calibration.validation)
    fits: bool | Callable[[Any], bool] = False

    def fitted(self, opts) -> bool:
        """Whether a step of this rule with `opts` fits tensors to the calibration samples."""
        return bool(self.fits(opts) if callable(self.fits) else self.fits)


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    if rule.name in RULES and RULES[rule.name] is not rule:
        raise ValueError(f"rule {rule.name!r} registered twice")
    RULES[rule.name] = rule
    return rule


@functools.cache   # once per group; a failed import is not cached, so the next call tries again
def load_plugins(group: str = "rewriter.rules") -> None:
    """Import every module named in the entry-point group `group` (rules register themselves in
    `rewriter.rules`, calibration text sources in `rewriter.text`)."""
    from importlib.metadata import entry_points
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:
            raise ImportError(f"the plug-ins of entry point {ep.name!r} ({ep.value}, group {group}) "
                              f"failed to import: {type(e).__name__}: {e}") from e


def all_rules() -> dict[str, Rule]:
    """Every registered rule: the built-in ones and third-party ones, through their entry points."""
    load_plugins("rewriter.rules")
    return dict(sorted(RULES.items()))


def get_rule(name: str) -> Rule:
    rules = all_rules()
    if name not in rules:
        raise KeyError(f"unknown rule {name!r}; known rules: {', '.join(rules)}")
    return rules[name]
