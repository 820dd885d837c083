"""The saved form of an OptimizedModel, and its validation before anything of it is used.

A saved model is a folder of four files, written by `OptimizedModel.save` and read by `load`:

    recipe.yaml           the recipe that was run (validated like any recipe)
    report.json           the report (plain JSON; its FLOP expressions are parsed, never evaluated)
    tensors.safetensors   every record's built tensors (`built.<i>.<name>`) and the traced example
                          inputs (`example.kw.<name>`, `example.arg.<i>`); safetensors holds no code
    records.json          {"format": FORMAT, "base": model name, "records": [...], "tensors": manifest}

`records.json` is written last, so a save that did not finish has none and reads as incomplete.
The manifest gives each tensor's dtype, shape and SHA-256, so a truncated, corrupted or
swapped tensor is found before it reaches the graph. Artifacts without `format` are version 1
(saved before it existed: no manifest) and still load.

A saved folder may have come from anyone, so reading it runs no code: YAML and JSON are parsed
safely, and a recipe `model:` of the form "package.module:function" (which `load_model` would
import and call) is refused unless the caller trusts it (`load(path, trust_code=True)`, CLI
`--trust-code`). Every fault is an `ArtifactError`: one line naming the file and what is wrong.
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch

FORMAT = 2
FILES = ("recipe.yaml", "records.json", "report.json", "tensors.safetensors")
STATUSES = ("applied", "rejected", "rolled_back", "error", "skipped")


class ArtifactError(ValueError):
    """A saved model that cannot be loaded as it is. `str(e)` is one line, "<file>: <fault>";
    `file` and `fault` hold the two parts."""

    def __init__(self, file, fault: str):
        self.file, self.fault = str(file), " ".join(str(fault).split())   # one line, whatever it quotes
        super().__init__(f"{self.file}: {self.fault}")


@dataclass
class Saved:
    """What a saved folder holds, validated (`read`); the model is not built yet."""

    path: Path
    format: int
    base: str | None
    recipe: object                    # rewriter.recipe.Recipe
    records: list                     # list[dict], each validated (`_records`)
    tensors: dict                     # name -> tensor, checked against the manifest (format >= 2)
    report: dict                      # report.json with its FLOP expressions parsed (`parse_flops`)

    def example(self) -> tuple[tuple, dict]:
        """The traced example inputs as (args, kwargs)."""
        kw = {k[len("example.kw."):]: v for k, v in self.tensors.items() if k.startswith("example.kw.")}
        pos = {int(k[len("example.arg."):]): v for k, v in self.tensors.items()
               if k.startswith("example.arg.")}
        return tuple(pos[i] for i in sorted(pos)), kw

    def built(self, i: int) -> dict:
        """Record i's built tensors, by name."""
        prefix = f"built.{i}."
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


# ---- writing -------------------------------------------------------------------------------------

def digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (any dtype, any shape)."""
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def manifest(tensors: dict) -> dict:
    return {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape), "sha256": digest(v)}
            for k, v in sorted(tensors.items())}


def write(path, *, recipe: dict, report_json: str, base: str | None, records: list[dict],
          tensors: dict) -> Path:
    """Write the four files; records.json last (see the module docstring)."""
    import yaml
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    (path / "records.json").unlink(missing_ok=True)       # an overwritten save is incomplete until the end
    save_file(tensors, str(path / "tensors.safetensors"))
    (path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (path / "report.json").write_text(report_json)
    meta = {"format": FORMAT, "base": base, "records": records, "tensors": manifest(tensors)}
    (path / "records.json").write_text(json.dumps(meta, indent=2, default=str))
    return path


# ---- reading -------------------------------------------------------------------------------------

def read(path) -> Saved:
    """Read and validate a saved folder: every file present and well formed, the format known, every
    applied record's rule registered and its options valid, every tensor a record names present (and,
    from format 2, of the dtype, shape and content the manifest says). Raises ArtifactError."""
    path = Path(path)
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "not a folder"
        raise ArtifactError(path, f"{what}: a saved model is a folder holding {', '.join(FILES)} "
                                  f"(OptimizedModel.save writes one)")
    for name in FILES:
        if not (path / name).is_file():
            raise ArtifactError(path / name, f"missing (a saved model holds {', '.join(FILES)}; "
                                             f"an interrupted save leaves records.json out)")
    file = path / "records.json"
    meta = _json(file)
    if not isinstance(meta, dict):
        raise ArtifactError(file, f"expected a JSON object with 'records', got {type(meta).__name__}")
    fmt = meta.get("format", 1)
    if type(fmt) is not int or fmt < 1:
        raise ArtifactError(file, f"format: expected a positive integer version, got {fmt!r}")
    if fmt > FORMAT:
        raise ArtifactError(file, f"format {fmt} is newer than this version of rewriter reads "
                                  f"(up to {FORMAT}); upgrade rewriter to load it")
    base = meta.get("base")
    if base is not None and not isinstance(base, str):
        raise ArtifactError(file, f"base: expected a model name, got {base!r}")
    records = _records(meta.get("records"), file)
    recipe = _recipe(path / "recipe.yaml")
    tensors = _tensors(path / "tensors.safetensors", meta.get("tensors") if fmt >= 2 else None, file)
    for i, r in enumerate(records):
        missing = [n for n in r["built"] if f"built.{i}.{n}" not in tensors]
        if missing:
            raise ArtifactError(path / "tensors.safetensors",
                                f"built.{i}.{missing[0]} missing: records.json lists it for records[{i}] "
                                f"({r['rule']})")
    report = _json(path / "report.json")
    if not isinstance(report, dict):
        raise ArtifactError(path / "report.json", f"expected a JSON object, got {type(report).__name__}")
    flops = report.get("attention_flops_per_token")
    if not isinstance(flops, dict) or {"before", "after"} - flops.keys():
        raise ArtifactError(path / "report.json", "attention_flops_per_token: expected {before, after}")
    report = dict(report, attention_flops_per_token={
        k: parse_flops(v, path / "report.json", f"attention_flops_per_token.{k}") for k, v in flops.items()})
    return Saved(path, fmt, base, recipe, records, tensors, report)


def _json(file: Path):
    try:
        return json.loads(file.read_text())
    except UnicodeDecodeError as e:
        raise ArtifactError(file, f"not text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(file, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None


def _recipe(file: Path):
    """The saved recipe, validated. Its calibration text file is not needed to replay, so a folder
    copied to another machine loads without it (the recipe keeps the path it names)."""
    from .recipe import RecipeError, load_recipe
    try:
        return load_recipe(file)
    except RecipeError as e:            # names the file and key; keep its first problem
        if e.path == "calibration.text" and "not found" in e.problem:
            return _recipe_without_text(file)
        raise ArtifactError(e.file, str(e).splitlines()[0].removeprefix(f"{e.file}: ")) from None
    except UnicodeDecodeError as e:
        raise ArtifactError(file, f"not text ({e.reason} at byte {e.start})") from None


def _recipe_without_text(file: Path):
    import yaml

    from .recipe import RecipeError, load_recipe
    data = yaml.safe_load(file.read_text())
    text = data["calibration"]["text"]
    try:
        recipe = load_recipe({**data, "calibration": {**data["calibration"], "text": "bundled"}})
    except RecipeError as e:
        raise ArtifactError(file, str(e).splitlines()[0].removeprefix(f"{e.file}: ")) from None
    recipe.calibration.text, recipe.source = text, str(file)
    return recipe


def _records(records, file: Path) -> list[dict]:
    """Each saved record checked field by field; an applied record's rule must be registered and its
    options must validate (its replay runs them)."""
    from pydantic import ValidationError

    from .rule import all_rules
    if not isinstance(records, list):
        raise ArtifactError(file, f"records: expected a list, got {type(records).__name__}")
    rules = all_rules()
    out = []
    for i, r in enumerate(records):
        where = f"records[{i}]"
        if not isinstance(r, dict):
            raise ArtifactError(file, f"{where}: expected an object, got {type(r).__name__}")
        r = dict(r)
        if not isinstance(r.get("rule"), str):
            raise ArtifactError(file, f"{where}.rule: expected a rule name, got {r.get('rule')!r}")
        if r.get("status") not in STATUSES:
            raise ArtifactError(file, f"{where}.status: {r.get('status')!r} is not one of "
                                      f"{', '.join(STATUSES)}")
        sites = r.get("sites", [] if r.get("site") is None else [r.get("site")])
        if not isinstance(sites, list) or not all(type(s) is int and s >= 0 for s in sites):
            raise ArtifactError(file, f"{where}.sites: expected a list of site indices, got {sites!r}")
        r["sites"] = sites
        modules = r.get("modules", [r.get("module")] if r.get("module") is not None else [])
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise ArtifactError(file, f"{where}.modules: expected a list of module names, got {modules!r}")
        r["modules"] = modules
        for key, kind in (("options", dict), ("info", dict), ("built", list)):
            r[key] = r.get(key) if r.get(key) is not None else kind()
            if not isinstance(r[key], kind):
                want = "mapping" if kind is dict else "list"
                raise ArtifactError(file, f"{where}.{key}: expected a {want}, got {type(r[key]).__name__}")
        if not all(isinstance(n, str) for n in r["built"]):
            raise ArtifactError(file, f"{where}.built: expected tensor names, got {r['built']!r}")
        if r["status"] == "applied":
            if r["rule"] not in rules:
                raise ArtifactError(file, f"{where}.rule: unknown rule {r['rule']!r} (registered: "
                                          f"{', '.join(rules) or 'none'}; a third-party rule's package must "
                                          f"be installed to replay it)")
            try:
                rules[r["rule"]].options(**r["options"])
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err.get("loc", ()))
                raise ArtifactError(file, f"{where}.options{'.' + loc if loc else ''}: {err.get('msg')} "
                                          f"(rule {r['rule']})") from None
            except TypeError as e:
                raise ArtifactError(file, f"{where}.options: {e} (rule {r['rule']})") from None
        out.append(r)
    return out


def _tensors(file: Path, expected: dict | None, records_file: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = str(e).strip() or type(e).__name__
        raise ArtifactError(file, f"not a readable safetensors file ({why})") from None
    if expected is None:                                    # format 1: no manifest
        return tensors
    if not isinstance(expected, dict):
        raise ArtifactError(records_file, f"tensors: expected the manifest of {file.name}, got "
                                          f"{type(expected).__name__}")
    for name in sorted(expected.keys() | tensors.keys()):
        want, t = expected.get(name), tensors.get(name)
        if t is None:
            raise ArtifactError(file, f"{name} missing (records.json's manifest lists it)")
        if not isinstance(want, dict):
            raise ArtifactError(file, f"{name}: not in records.json's manifest (an added tensor)")
        got = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for key in ("dtype", "shape"):
            if want.get(key) != got[key]:
                raise ArtifactError(file, f"{name}: {key} {got[key]}, but records.json's manifest says "
                                          f"{want.get(key)}")
        if want.get("sha256") != digest(t):
            raise ArtifactError(file, f"{name}: its content differs from what was saved (SHA-256 mismatch "
                                      f"with records.json's manifest): the file is corrupted or was edited")
    return tensors


# ---- checks that need the model ------------------------------------------------------------------

def check_model_spec(spec: str, file, key: str, *, registered, trust_code: bool) -> None:
    """Refuse a "package.module:function" model spec read from a saved folder unless trusted:
    `rewriter.models.load_model` would import the module (running its top level) and call the function.
    Registered names and model folders load without running code of the artifact."""
    if spec in registered or Path(spec).expanduser().is_dir():
        return
    if ":" in spec and not spec.startswith((".", "/", "~")) and not trust_code:
        raise ArtifactError(file, f"{key}: {spec!r} names code to import and run; a saved model may come "
                                  f"from anyone, so load() refuses it: pass trust_code=True (CLI: "
                                  f"--trust-code) if you trust this folder, or pass the model yourself "
                                  f"(load(path, model=...))")


def check_sites(saved: Saved, sites) -> None:
    """Every applied record names sites the model has, with the module names saved: otherwise the
    artifact was made for another model (or edited)."""
    by_index = {s.index: s for s in sites}
    file = saved.path / "records.json"
    for i, r in enumerate(saved.records):
        if r["status"] != "applied":
            continue
        for j, s in enumerate(r["sites"]):
            if s not in by_index:
                raise ArtifactError(file, f"records[{i}].sites: site {s} does not exist: the model has "
                                          f"{len(sites)} attention sites (an artifact of another model?)")
            if j < len(r["modules"]) and r["modules"][j] != by_index[s].module:
                raise ArtifactError(file, f"records[{i}].modules: site {s} is {by_index[s].module!r} in this "
                                          f"model, but the record was made at {r['modules'][j]!r} "
                                          f"(an artifact of another model?)")


def shapes(args: tuple, kwargs: dict) -> str:
    """Example inputs as "input_ids [1, 16], attention_mask [1, 16]" for messages."""
    named = {f"args[{i}]": v for i, v in enumerate(args)} | dict(kwargs)
    return ", ".join(f"{k} {list(v.shape)}" for k, v in named.items()
                     if isinstance(v, torch.Tensor)) or "none"


# ---- FLOP expressions, parsed without eval ------------------------------------------------------

_FUNCTIONS = {"Min": sympy.Min, "Max": sympy.Max, "sqrt": sympy.sqrt, "ceiling": sympy.ceiling,
              "floor": sympy.floor, "log": sympy.log}
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: sympy.floor(a / b)}


def parse_flops(text, file, key: str) -> sympy.Expr:
    """A report's FLOP expression in the sequence length N (e.g. "2048*Min(4, N) + 131584") as sympy,
    from its syntax tree: numbers, N, + − × ÷, small powers and Min/Max/sqrt/ceiling/floor/log only.
    `sympy.sympify` would `eval` the text, so a report.json could otherwise run code."""
    from .report import N
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or len(text) > 10_000:
        raise ArtifactError(file, f"{key}: expected an expression in N, got {str(text)[:60]!r}")

    def bad(why: str):
        return ArtifactError(file, f"{key}: {text[:80]!r} is not a FLOP expression in N ({why})")

    def conv(n):
        if isinstance(n, ast.Expression):
            return conv(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float):
            if isinstance(n.value, float) and not math.isfinite(n.value):
                raise bad("not finite")
            return sympy.Integer(n.value) if isinstance(n.value, int) else sympy.Float(n.value)
        if isinstance(n, ast.Name) and n.id == "N":
            return N
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.USub, ast.UAdd)):
            v = conv(n.operand)
            return -v if isinstance(n.op, ast.USub) else v
        if isinstance(n, ast.BinOp) and type(n.op) in _BINARY:
            return _BINARY[type(n.op)](conv(n.left), conv(n.right))
        if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow):
            e = conv(n.right)
            if not (e.is_number and abs(float(e)) <= 8):
                raise bad("only small constant powers are allowed")
            return conv(n.left) ** e
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCTIONS \
                and not n.keywords and n.args:
            return _FUNCTIONS[n.func.id](*(conv(a) for a in n.args))
        raise bad(f"{type(n).__name__} is not allowed")
    try:
        return conv(ast.parse(text.strip(), mode="eval"))
    except SyntaxError as e:
        raise bad(f"syntax: {e.msg}") from None
    except RecursionError:
        raise bad("nested too deeply") from None
