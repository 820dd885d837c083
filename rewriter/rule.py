"""The Rule contract and the rule registry.

A rule is data: a name, the paper it implements, whether it is exact, a pydantic model of
its recipe options, and three functions:

    check(site, opts)              -> None to accept, or a sentence saying why not
    build(ctx, site, opts)         -> dict[str, Tensor]; pure tensor math, the model untouched
    apply(gm, site, built, opts)   -> None; edits the traced graph through rewriter.graph helpers

`plan(ctx, sites, opts)` (optional) orders or ranks the candidate sites (LLM-Drop ranks by
importance); without it, sites go in graph order. The driver snapshots, gates, records and
rolls back; rules never do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .site import AttentionSite


class StepOptions(BaseModel):
    """Options every rule step accepts. Rules subclass this with their own fields."""

    model_config = ConfigDict(extra="forbid")

    layers: str | list[int] | None = Field(
        default=None,
        description='Which sites to target: "all" (default), "auto" where the rule supports it, '
        'a range such as "2-5", a comma list "0,3,5", or a YAML list [0, 3].')

    @field_validator("layers")
    @classmethod
    def _layers_syntax(cls, v):
        if isinstance(v, str) and v not in ("all", "auto"):
            if not re.fullmatch(r"\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*", v):
                raise ValueError(f'layers must be "all", "auto", "A-B", "A,B,C" or a list of ints; got {v!r}')
        return v

    def selects(self, site: AttentionSite) -> bool:
        """Whether `layers` selects this site (matched on site.layer, falling back to site.index)."""
        v = self.layers
        if v is None or v in ("all", "auto"):
            return True
        key = site.layer if site.layer is not None else site.index
        return key in parse_layers(v)


def parse_layers(v: str | list[int]) -> set[int]:
    if isinstance(v, list):
        return set(v)
    out: set[int] = set()
    for part in v.split(","):
        a, _, b = part.strip().partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


class Refused(Exception):
    """Raised by a rule's build when what it measured or found rules the site out (a refusal
    `check` could not make from the site alone): the driver records the site as rejected with
    this message, not as an error."""


@dataclass(frozen=True)
class Rule:
    name: str
    paper: str                     # citation, e.g. 'Men et al., "What Matters in Transformers?", arXiv:2406.15786'
    summary: str                   # one line: what the rewrite does
    exact: bool                    # exact rewrites may skip the gate; approximate ones never do
    options: type[StepOptions]
    check: Callable[[AttentionSite, Any], str | None]
    build: Callable[[Any, AttentionSite, Any], dict]
    apply: Callable[[Any, AttentionSite, dict, Any], None]
    plan: Callable[[Any, list[AttentionSite], Any], list[AttentionSite]] | None = None
    cost: Callable[[AttentionSite, Any], Any] | None = None   # attention FLOPs/token after the rewrite (sympy, in N)
    kind: Literal["attention", "memory", "structure"] = "attention"


RULES: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    if rule.name in RULES and RULES[rule.name] is not rule:
        raise ValueError(f"rule {rule.name!r} registered twice")
    RULES[rule.name] = rule
    return rule


def all_rules() -> dict[str, Rule]:
    """Every registered rule (importing rewriter.patterns registers the built-in ones)."""
    import rewriter.patterns  # noqa: F401  (registers on import)
    return dict(sorted(RULES.items()))


def get_rule(name: str) -> Rule:
    rules = all_rules()
    if name not in rules:
        raise KeyError(f"unknown rule {name!r}; known rules: {', '.join(rules)}")
    return rules[name]
