"""Recipes: a YAML file (or a dict) validated into typed objects.

    model: minilm                     # optional: registered name, HF folder path, or "module:function"
    calibration: {text: auto, samples: 64, seq_len: 128, lengths: auto, batch_size: 8, heldout: 16}
    gate: {metric: embedding_cosine, min: 0.97, min_worst: 0.90}
    budget: {max_sites: null, max_seconds: null}
    steps:
      - drop_attention: {max_layers: 2}
    output: out/minilm-drop           # optional

Each step is a single-key mapping `{rule_name: options}`; the options are validated by that
rule's own pydantic model (`rewriter.rule.get_rule(name).options`), so a recipe can never name
an option a rule does not read. Every problem is reported as one line,

    <file>: <key.path>: <problem>; allowed: <what is allowed>

never as a pydantic dump, so a user can fix the recipe without reading this code.

Paths: `calibration.text` resolves against the recipe file's folder (the text ships with the
recipe); `output` is left as written and so resolves against the working directory, like
any output flag of a command-line tool.
"""
from __future__ import annotations

import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .calibrate import text_sources
from .rule import StepOptions, all_rules, get_rule

__all__ = ["RecipeError", "CalibrationSpec", "GateSpec", "BudgetSpec", "Step", "Recipe",
           "load_recipe", "recipe_schema", "default_gate", "GATE_BOUNDS", "MODEL_KINDS"]

TOP_LEVEL_KEYS = ("model", "calibration", "gate", "budget", "steps", "output")
TEXT_SUFFIXES = (".txt", ".jsonl")


def _text_allowed(sources: dict) -> str:
    kinds = [k for k, v in sources.items() if v == (k,)]
    mix = "+".join(kinds[1:3]) if len(kinds) > 2 else "a+b"
    return (f"{', '.join(['auto', *sources])}, a '+'-joined mix such as {mix}, or a path to a .txt or "
            f".jsonl file")

# metric -> the bound key it takes, the keys it may take besides, and the range of their values
GATE_BOUNDS: dict[str, tuple[str, tuple[str, ...], tuple[float, float, str]]] = {
    "relative_rms": ("max", (), (0.0, math.inf, "a number >= 0")),
    "embedding_cosine": ("min", ("min_worst",), (-1.0, 1.0, "a number in [-1, 1]")),
    "kl": ("max", (), (0.0, math.inf, "a number >= 0")),
    "top1_agreement": ("min", (), (0.0, 1.0, "a number in [0, 1]")),
    "perplexity_ratio": ("max", (), (1.0, math.inf, "a number >= 1 (1.05 allows 5 % higher perplexity)")),
}
MODEL_KINDS = ("encoder", "causal_lm", "vision", "generic")


class RecipeError(ValueError):
    """A recipe that cannot be used. `str(e)` is one line per problem, the first problem first:

        recipes/a.yaml: steps[1].drop_attention.max_layers: must be >= 1, got 0; allowed: an integer >= 1

    Attributes: `file`, `path` (the key path, "" for the whole file), `problem`, `allowed`
    (all of the first problem) and `issues`, a list of (path, problem, allowed) for every problem.
    """

    def __init__(self, file: str, path: str, problem: str, allowed: str | None = None,
                 more: list[tuple[str, str, str | None]] | None = None):
        self.file, self.path, self.problem, self.allowed = file, path, problem, allowed
        self.issues = [(path, problem, allowed)] + list(more or [])
        super().__init__("\n".join(_format(file, *issue) for issue in self.issues))


def _format(file: str, path: str, problem: str, allowed: str | None) -> str:
    where = f"{file}: {path}: " if path else f"{file}: "
    line = where + problem + (f"; allowed: {allowed}" if allowed else "")
    # one line per problem whatever the document holds: a key such as "a\rb" is shown escaped
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


# ---------------------------------------------------------------- the typed sections

class _Spec(BaseModel):
    # strict: YAML already gives typed values, so "64" or true for an integer is a mistake
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class CalibrationSpec(_Spec):
    """Where calibration inputs come from and how many (see rewriter.models.make_calibration)."""

    text: str = Field("auto", description="auto (causal LMs: mix; encoders: bundled) | mix (bundled, pydoc, "
                      "python and legal text, each judged on its own) | bundled | pydoc | python | legal | "
                      "a '+'-joined mix such as pydoc+python | path to a .txt (one sample per line or "
                      "paragraph) or .jsonl file (objects with a \"text\" field); relative paths resolve "
                      "against the recipe file's folder")
    samples: int = Field(64, gt=0, description="calibration samples of seq_len tokens (sequences or images); "
                         "over several kinds of text and lengths, this many samples' tokens spread evenly")
    seq_len: int = Field(128, gt=0, description="tokens per sample (maximum for padded encoders)")
    lengths: Literal["auto"] | list[Annotated[int, Field(gt=0)]] = Field(
        "auto", description="token lengths to draw calibration samples at and to judge every rewrite at "
        "(the worst decides); auto: a causal LM's seq_len and 4 x seq_len (capped at its position "
        "limit), other models seq_len")
    batch_size: int = Field(8, gt=0, description="samples of seq_len tokens per forward pass (fewer at "
                            "longer lengths)")
    heldout: int = Field(16, ge=0, description="extra samples, never used for calibration, for the "
                         "final held-out accuracy check (0 skips it)")
    validation: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        "auto", description="samples drawn like the calibration samples but never fitted on; the gate "
        "judges every rewrite on them instead of on the calibration samples (0). auto: a quarter of "
        "samples when a step fits tensors to calibration data (linear_attention, masa, normlin, "
        "agent_attention with calibrate), so the gate catches a fit that only memorized; else 0")

    def resolved(self, steps: list | None = None) -> dict:
        """The keyword arguments of make_calibration / calibration_from, ``validation: auto``
        resolved against the recipe's `steps`."""
        d = self.model_dump()
        if d["validation"] == "auto":
            fits = any(get_rule(s.rule).fitted(s.options) for s in steps or [])
            d["validation"] = max(1, self.samples // 4) if fits else 0
        return d


class GateSpec(_Spec):
    """One accuracy metric and its bound, measured on the rewritten model versus the original.

    | metric            | bound              | meaning                                               |
    |-------------------|--------------------|-------------------------------------------------------|
    | relative_rms      | max                | ‖y' − y‖ / ‖y‖ over the output tensor                  |
    | embedding_cosine  | min (+ min_worst)  | mean cosine of embeddings (min_worst: worst sample)   |
    | kl                | max                | mean KL(p ‖ p') of next-token distributions           |
    | top1_agreement    | min                | share of positions / images whose argmax is unchanged |
    | perplexity_ratio  | max                | perplexity(rewritten) / perplexity(original)          |
    """

    metric: Literal["relative_rms", "embedding_cosine", "kl", "top1_agreement", "perplexity_ratio"] = \
        Field(description="the accuracy metric")
    min: float | None = Field(None, description="lower bound (embedding_cosine, top1_agreement)")
    max: float | None = Field(None, description="upper bound (relative_rms, kl, perplexity_ratio)")
    min_worst: float | None = Field(None, description="embedding_cosine only: lower bound for the "
                                    "worst single sample")
    decode: bool | float | None = Field(
        None, description="perplexity_ratio only: judge the model as generation runs it, teacher-forced: "
        "each gate batch's first share of tokens prefilled (true: 0.5, or a number in (0, 1)), each later "
        "token fed by one decode step of the lowered model, and only the decoded tokens judged")

    @model_validator(mode="after")
    def _bounds(self) -> "GateSpec":
        key, extra, (lo, hi, in_range) = GATE_BOUNDS[self.metric]

        def fail(message: str, path: str, allowed: str, **ctx):   # `path`, `allowed`: for _phrase
            ctx = {"metric": self.metric, "key": key, "path": path, "allowed": allowed, **ctx}
            raise PydanticCustomError("gate_bound", message, ctx)

        for other in ("min", "max", "min_worst"):
            if other not in (key, *extra) and getattr(self, other) is not None:
                fail("metric {metric} takes no {other} bound (it is bounded by {key})", other,
                     ", ".join((key, *extra)), other=other)
        if getattr(self, key) is None:
            fail("metric {metric} needs a {key} bound", key, f"{key}: <number>")
        for k in (key, *extra):
            v = getattr(self, k)
            if v is not None and not (math.isfinite(v) and lo <= v <= hi):
                fail("{metric} {key} bound {value} is out of range", k, in_range, key=k, value=v)
        if self.decode is not None and self.decode is not False:
            if self.metric != "perplexity_ratio":
                fail("decode judges generation by perplexity; metric {metric} cannot", "decode",
                     "decode with metric: perplexity_ratio")
            share = 0.5 if self.decode is True else float(self.decode)
            if not 0 < share < 1:
                fail("decode {value}: the share of tokens prefilled must be in (0, 1)", "decode",
                     "true, or a number in (0, 1)", value=self.decode)
        return self

    @property
    def decode_share(self) -> float | None:
        """The share of each gate batch's tokens prefilled when the gate judges decoding, else None."""
        if self.decode is None or self.decode is False:
            return None
        return 0.5 if self.decode is True else float(self.decode)

    @property
    def bound(self) -> tuple[str, float]:
        """("min" | "max", the bound), e.g. ("min", 0.97)."""
        key = GATE_BOUNDS[self.metric][0]
        return key, getattr(self, key)

    @property
    def higher_is_better(self) -> bool:
        return GATE_BOUNDS[self.metric][0] == "min"

    def failures(self, value: float, worst: float | None = None) -> list[str]:
        """Every bound `value` (and, for embedding_cosine with min_worst, `worst`) breaks, as
        sentences such as "embedding_cosine 0.951 < min 0.97"; empty when the gate is met."""
        key, bound = self.bound
        if not math.isfinite(value):
            return [f"{self.metric} is {value}"]
        out = []
        if key == "min" and value < bound:
            out.append(f"{self.metric} {value:.4g} < min {bound:g}")
        if key == "max" and value > bound:
            out.append(f"{self.metric} {value:.4g} > max {bound:g}")
        if self.min_worst is not None and worst is not None and not worst >= self.min_worst:
            out.append(f"{self.metric} of the worst sample {worst:.4g} < min_worst {self.min_worst:g}")
        return out

    def check(self, value: float, worst: float | None = None) -> str | None:
        """None when the gate is met, else its failures joined by "; " (see `failures`)."""
        return "; ".join(self.failures(value, worst)) or None


class BudgetSpec(_Spec):
    """Limits on the driver: it stops, and says why, when one is reached."""

    max_sites: int | None = Field(None, gt=0, description="most site rewrites to keep, over all steps")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock limit for optimize()")


def default_gate(kind: str) -> GateSpec:
    """The gate used when a recipe has none, by model kind (encoder: a text embedding model,
    vision: a classifier)."""
    defaults = {
        "encoder": GateSpec(metric="embedding_cosine", min=0.97, min_worst=0.90),
        "causal_lm": GateSpec(metric="perplexity_ratio", max=1.05),
        "vision": GateSpec(metric="top1_agreement", min=0.95),
        "generic": GateSpec(metric="relative_rms", max=0.05),
    }
    if kind not in defaults:
        raise ValueError(f"default_gate: unknown model kind {kind!r}; allowed: {', '.join(MODEL_KINDS)}")
    return defaults[kind]


@dataclass
class Step:
    rule: str                # a registered rule name
    options: StepOptions     # an instance of that rule's options model

    def to_dict(self) -> dict:
        return {self.rule: self.options.model_dump(mode="json")}


@dataclass
class Recipe:
    """A validated recipe. Build one with `load_recipe` (which checks everything)."""

    model: str | None = None              # None: applies to the model passed to optimize()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    gate: GateSpec | None = None          # None: the engine uses default_gate(kind)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    steps: list[Step] = field(default_factory=list)
    output: str | None = None
    source: str | None = field(default=None, compare=False)  # the file it came from, for messages

    def to_dict(self) -> dict:
        """A plain dict (YAML/JSON-ready) that `load_recipe` turns back into an equal Recipe."""
        return {
            "model": self.model,
            "calibration": self.calibration.model_dump(),
            "gate": None if self.gate is None else self.gate.model_dump(exclude_none=True),
            "budget": self.budget.model_dump(),
            "steps": [s.to_dict() for s in self.steps],
            "output": self.output,
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- loading

def load_recipe(src: str | os.PathLike | dict | Recipe) -> Recipe:
    """A Recipe from a YAML file path, a dict of the same shape, or a Recipe (returned as is).

    Raises RecipeError naming the file, the key path and what is allowed."""
    if isinstance(src, Recipe):
        return src
    if isinstance(src, dict):
        return _from_dict(src, file="<recipe>", base=Path.cwd())
    if isinstance(src, (str, os.PathLike)):
        recipe = _from_dict(_read_yaml(Path(src)), file=str(src), base=Path(src).resolve().parent)
        recipe.source = str(src)
        return recipe
    raise TypeError(f"load_recipe: expected a path to a YAML file, a dict or a Recipe, "
                    f"got {type(src).__name__}")


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue                 # construct_mapping reports unhashable keys itself
            if key in seen:
                raise _DuplicateKey(None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    file = str(path)
    if not path.exists():
        raise RecipeError(file, "", f"recipe file not found (looked in {path.resolve().parent})")
    if path.is_dir():
        raise RecipeError(file, "", "is a folder, not a recipe file", "a .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(file, "", f"cannot read: {e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as e:
        mark = e.problem_mark
        raise RecipeError(file, "", f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}",
                          "each key once per mapping") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = e.problem or "invalid YAML"
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            what += f" ({e.context} that starts at line {e.context_mark.line + 1})"
        elif e.context:
            what += f" ({e.context})"
        raise RecipeError(file, "", f"{where}YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise RecipeError(file, "", f"YAML syntax error: {e}") from None


def _from_dict(data: Any, *, file: str, base: Path) -> Recipe:
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {_type_name(data)}"
        raise RecipeError(file, "", f"the recipe must be a mapping of keys, got {got}",
                          ", ".join(TOP_LEVEL_KEYS))
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise RecipeError(file, str(key), f"unknown key{_did_you_mean(key, TOP_LEVEL_KEYS)}",
                              ", ".join(TOP_LEVEL_KEYS))

    model = _resolve_model(_optional_str(data.get("model"), file, "model",
                                         'a registered name, an HF folder path, or "module:function"'), base)
    output = _optional_str(data.get("output"), file, "output", "a folder path")

    calibration = _section(CalibrationSpec, data.get("calibration"), file, "calibration")
    calibration.text = _resolve_text(calibration.text, file, base)
    gate = None if data.get("gate") is None else _section(GateSpec, data["gate"], file, "gate")
    budget = _section(BudgetSpec, data.get("budget"), file, "budget")
    steps = _steps(data.get("steps"), file)
    return Recipe(model=model, calibration=calibration, gate=gate, budget=budget, steps=steps,
                  output=output)


def _optional_str(v: Any, file: str, path: str, allowed: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise RecipeError(file, path, f"expected a non-empty string, got {_show(v)}", allowed)
    return v


def _resolve_model(spec: str | None, base: Path) -> str | None:
    """A relative folder path that exists beside the recipe becomes absolute; registered
    names and "module:function" specs are left for rewriter.models.load_model."""
    if spec and ("/" in spec or spec.startswith(".")) and not Path(spec).is_absolute():
        candidate = base / spec
        if candidate.exists():
            return str(candidate.resolve())
    return spec


def _resolve_text(text: str, file: str, base: Path) -> str:
    sources = text_sources()      # registered by models/text.py (and plug-ins): rewriter.calibrate
    allowed = _text_allowed(sources)
    if text == "auto" or text in sources:
        return text
    parts = text.split("+")
    if len(parts) > 1 and all(sources.get(p) == (p,) for p in parts):
        if len(set(parts)) < len(parts):
            raise RecipeError(file, "calibration.text", f"{text!r} names a kind of text twice", allowed)
        return text
    path = Path(text).expanduser()
    if path.suffix not in TEXT_SUFFIXES:
        raise RecipeError(file, "calibration.text",
                          f"{text!r} is neither a known source nor a .txt/.jsonl file", allowed)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise RecipeError(file, "calibration.text",
                          f"calibration text file not found: {path} (relative paths resolve against "
                          f"{base})", allowed)
    return str(path.resolve())


def _section(model: type[BaseModel], value: Any, file: str, prefix: str, word: str = "key",
             not_mapping: str = "expected a mapping"):
    """`value` (None: empty) validated by `model`; `word` names its keys in messages."""
    if not isinstance(value if value is not None else {}, dict):
        raise RecipeError(file, prefix, f"{not_mapping}, got {_show(value)}", _keys_of(model))
    try:
        return model.model_validate(value or {})
    except ValidationError as e:
        raise _convert(e, model, file, prefix, word) from None


def _steps(value: Any, file: str) -> list[Step]:
    rules = all_rules()
    known = ", ".join(rules) or "(no rules registered)"
    shape = "a list of single-key mappings, e.g. - drop_attention: {max_layers: 2}"
    if value is None or value == []:
        raise RecipeError(file, "steps", "the recipe has no steps; it needs at least one", shape)
    if not isinstance(value, list):
        raise RecipeError(file, "steps", f"expected a list, got {_show(value)}", shape)
    steps = []
    for i, item in enumerate(value):
        path = f"steps[{i}]"
        if isinstance(item, str):           # `- drop_attention` is `- drop_attention: {}`
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            got = (f"a mapping with {len(item)} keys ({', '.join(map(str, item))})"
                   if isinstance(item, dict) else _show(item))
            raise RecipeError(file, path, f"each step must be a single-key mapping "
                              f"{{rule: options}}, got {got}", shape)
        (name, opts), = item.items()
        if name not in rules:
            raise RecipeError(file, f"{path}.{name}",
                              f"unknown rule {name!r}{_did_you_mean(name, rules)}", known)
        if isinstance(opts, StepOptions):
            opts = opts.model_dump(exclude_unset=True)
        steps.append(Step(name, _section(rules[name].options, opts, file, f"{path}.{name}", "option",
                                         "options must be a mapping (or empty)")))
    return steps


# ---------------------------------------------------------------- pydantic errors -> one line each

def _convert(err: ValidationError, model: type[BaseModel], file: str, prefix: str,
             option_word: str = "key") -> RecipeError:
    """Group pydantic's errors by field (a union reports one error per branch) and phrase each."""
    groups: dict[tuple, list[dict]] = {}
    for e in err.errors():
        loc = e["loc"]
        ctx = e.get("ctx") or {}
        key = (loc[0],) if loc else ((ctx["path"],) if "path" in ctx else ())
        groups.setdefault(key, []).append(e)
    issues = [_phrase(key, errs, model, prefix, option_word) for key, errs in groups.items()]
    (path, problem, allowed), *more = issues
    return RecipeError(file, path, problem, allowed, more)


_LIMITS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}   # pydantic's bound names, in words
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
             "bool_type": "true or false", "bool_parsing": "true or false",
             "list_type": "a list", "dict_type": "a mapping", "finite_number": "a finite number"}


def _phrase(key: tuple, errs: list[dict], model: type[BaseModel], prefix: str, option_word: str):
    fields = model.model_fields
    name = key[0] if key else None
    path = prefix + (f".{name}" if name is not None else "")
    e = errs[0]
    kind, ctx, got = e["type"], e.get("ctx") or {}, e.get("input")
    info = fields.get(name) if isinstance(name, str) else None
    described = _allowed_for(info)

    if kind == "extra_forbidden":
        return (path, f"unknown {option_word}{_did_you_mean(name, fields)}", _keys_of(model))
    if kind == "missing":
        return (path, "required", described)
    if kind == "gate_bound":
        return (path, e["msg"], ctx.get("allowed"))
    if len(errs) > 1 or (len(e["loc"]) > 1 and isinstance(e["loc"][1], str)):
        # a union: one error per branch, tagged with the branch's type name
        branches = sorted({str(x["loc"][1]) for x in errs if len(x["loc"]) > 1})
        return (path, f"invalid value {_show(got)}", described or " or ".join(branches))
    index = "".join(f"[{i}]" for i in e["loc"][1:] if isinstance(i, int))
    path += index
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        (limit, bound), = ctx.items()   # e.g. ("gt", 0)
        return (path, f"must be {_LIMITS[limit]} {bound}, got {_show(got)}", described)
    if kind in _EXPECTED:
        return (path, f"expected {_EXPECTED[kind]}, got {_show(got)}", described)
    if kind in ("literal_error", "enum"):
        choices = _literal_choices(info.annotation) if info is not None else []
        return (path, f"{_show(got)} is not allowed{_did_you_mean(got, choices)}", ctx.get("expected"))
    # a rule's own validator: its message already says what is allowed
    return (path, e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, "), None)


def _allowed_for(info) -> str | None:
    """What a field accepts, in words: "an integer > 0 or null", or its description for unions."""
    if info is None:
        return None
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)] if _is_union(ann) else [ann]
    nullable = _is_union(ann) and len(args) < len(typing.get_args(ann))
    if len(args) != 1:
        return info.description
    (tp,) = args
    if typing.get_origin(tp) is Literal:
        words = " or ".join(repr(c) for c in typing.get_args(tp))
    else:
        words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp)
        if words is None:
            return info.description
        for m in info.metadata:
            for attr, op in _LIMITS.items():
                if getattr(m, attr, None) is not None:
                    words += f" {op} {getattr(m, attr)}"
    return words + (" or null" if nullable else "")


def _is_union(ann) -> bool:
    return typing.get_origin(ann) in (typing.Union, types.UnionType)


def _literal_choices(ann) -> list:
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    return [c for a in typing.get_args(ann) for c in _literal_choices(a)]


def _keys_of(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "(none)"


def _did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_name(v: Any) -> str:
    return {list: "list", str: "string", int: "integer", float: "number", bool: "boolean",
            dict: "mapping"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (dict, list)):
        text = repr(v)
        return f"a {_type_name(v)} {text if len(text) <= 60 else text[:57] + '...'}"
    return f"{v!r} ({_type_name(v)})"


# ---------------------------------------------------------------- JSON Schema (editors, `rewriter schema`)

def recipe_schema() -> dict:
    """JSON Schema (draft 2020-12) of a recipe, with every registered rule's options."""
    from pydantic.json_schema import models_json_schema

    rules = all_rules()
    models = [CalibrationSpec, GateSpec, BudgetSpec, *(r.options for r in rules.values())]
    refs, top = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    defs = top.get("$defs", {})

    def nullable(model: type[BaseModel], **more) -> dict:
        return {"anyOf": [refs[(model, "validation")], {"type": "null"}], **more}

    # the bound each metric takes, which pydantic's schema cannot say
    gate_name = refs[(GateSpec, "validation")]["$ref"].rsplit("/", 1)[-1]
    conditions = []
    for metric, (key, extra, _) in GATE_BOUNDS.items():
        banned = [k for k in ("min", "max", "min_worst") if k != key and k not in extra]
        conditions.append({"if": {"properties": {"metric": {"const": metric}}},
                           "then": {"required": [key], "not": {"anyOf": [{"required": [b]}
                                                                         for b in banned]}}})
    defs[gate_name]["allOf"] = conditions

    step_variants = [{
        "type": "object", "title": name, "description": f"{r.summary} ({r.paper})",
        "properties": {name: nullable(r.options)},
        "required": [name], "additionalProperties": False,
    } for name, r in rules.items()]
    step_variants.append({"type": "string", "enum": list(rules), "description": "a rule with its defaults"})

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "rewriter recipe",
        "type": "object",
        "additionalProperties": False,
        "required": ["steps"],
        "properties": {
            "model": {"type": ["string", "null"],
                      "description": 'registered name, HF folder path, or "module:function"; '
                                     "without it the recipe applies to the model passed to optimize()"},
            "calibration": nullable(CalibrationSpec),
            "gate": nullable(GateSpec,
                             description="null: the per-kind default (rewriter.recipe.default_gate)"),
            "budget": nullable(BudgetSpec),
            "steps": {"type": "array", "minItems": 1, "items": {"oneOf": step_variants}},
            "output": {"type": ["string", "null"], "description": "folder to save the result in"},
        },
        "$defs": defs,
    }
