"""The `rewriter` command line.

    rewriter run RECIPE [--model SPEC] [--output DIR] [--json] [--nproc N] [--max-memory SIZE]
                                                                 optimize a model as a recipe says
    rewriter inspect MODEL [--json] [--seq-len N] [--eager]      attention sites found; nothing changed
    rewriter rules [--json]                                      every rewrite rule with its paper
    rewriter schema                                              JSON Schema of recipes (for editors)
    rewriter models [--json]                                     registered model names
    rewriter eval SAVED_DIR [--text TEXT] [--lengths N,N] [--json]   re-measure a saved model against its base
    rewriter export SAVED_DIR --onnx FILE                        ONNX, dynamic batch and length
    rewriter generate SAVED_DIR --prompt TEXT [--max-new-tokens N] [--compile]   stream a continuation
    rewriter bench SAVED_DIR [--seq 128,512,2048] [--batch 1] [--png FILE]   latency against length

Exit status: 0 done; 1 the model could not be traced or optimized (`eval`: the saved model is outside
its gate's bound on that text); 2 a usage error (bad
arguments, a recipe that does not validate, a model that cannot be found or loaded). Expected
failures print one message on stderr and no traceback; `--debug` shows the traceback.

Data parallel (rewriter/distributed.py): `rewriter run --nproc N` starts N local ranks of itself;
`torchrun --nproc_per_node N -m rewriter run RECIPE` starts them from outside (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Rank 0 prints the progress and the report and saves; the other ranks
print nothing but their own errors, each prefixed with its rank.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Failure(Exception):
    """An expected failure: printed as one message, exits with `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a usage error argparse already printed (2)
        return int(e.code or 0)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 (sorted into expected failures below; the rest re-raised)
        if args.debug:
            raise
        failure = _expected(e)
        if failure is None:
            raise
        _error(str(failure))
        return failure.code


def _expected(e: Exception) -> _Failure | None:
    """Map the exceptions a user can cause to an exit status; None for bugs (shown with traceback)."""
    from .artifact import ArtifactError
    from .recipe import RecipeError
    from .trace import TraceError
    if isinstance(e, _Failure):
        return e
    if isinstance(e, (RecipeError, ArtifactError)):      # a saved folder that cannot be loaded: one line
        return _Failure(str(e), EXIT_USAGE)
    if isinstance(e, TraceError):
        return _Failure(str(e), EXIT_FAILED)
    from .distributed import DistributedError
    if isinstance(e, DistributedError):             # a rank failed (named) or the ranks disagreed
        return _Failure(str(e), EXIT_FAILED)
    return None


def _rank_prefix() -> str:
    """'rank R of N: ' inside a data-parallel run (RANK / WORLD_SIZE in the environment), else ''."""
    import os
    size, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK")
    return f"rank {rank} of {size}: " if rank is not None and size not in ("", "1") else ""


def _error(message: str) -> None:
    sys.stderr.write(f"rewriter: error: {_rank_prefix()}{message}\n")
    sys.stderr.flush()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rewriter",
        description="Graph-rewriting optimizer for PyTorch transformer models: trace, find attention, "
                    "apply paper-backed rewrites, gate each on accuracy.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    saved = argparse.ArgumentParser(add_help=False)          # the commands that rebuild a saved folder
    saved.add_argument("saved", metavar="SAVED_DIR", help="a folder written by OptimizedModel.save")
    saved.add_argument("--trust-code", action="store_true", help="allow the saved recipe's model: "
                       '"module:function" to be imported and called')

    r = sub.add_parser("run", parents=[common], help="optimize a model as a recipe says",
                       description="Load the recipe and its model, apply the steps with the accuracy gate, "
                                   "print the report and save the result.")
    r.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    r.add_argument("--model", metavar="SPEC", help='model to use instead of the recipe\'s `model:` '
                   '(registered name, HF folder, or "module:function")')
    r.add_argument("--output", metavar="DIR", help="save here instead of the recipe's `output:`")
    r.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    r.add_argument("--nproc", type=_positive_int, metavar="N", default=None,
                   help="run as N local processes that share the calibration, validation, gate and held-out "
                        "batches (data parallel, gloo; the same result as one process); under torchrun the "
                        "ranks come from the environment instead")
    r.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="keep at most SIZE (e.g. 300MB, 2GiB) of the model's weights in memory and read the "
                        "rest from disk as each layer runs (accelerate's offloading; rewriter/offload.py): for "
                        "a model larger than memory. The same decisions, slower")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("inspect", parents=[common], help="list the attention sites of a model; changes nothing",
                       description="Trace the model, canonicalize attention and list every site found, "
                                   "or say what was seen instead.")
    i.add_argument("model", metavar="MODEL", help='registered name, HF folder, or "module:function"')
    i.add_argument("--json", action="store_true", help="print sites and notes as JSON")
    i.add_argument("--seq-len", type=_positive_int, metavar="N", help="trace on example inputs of N tokens")
    i.add_argument("--eager", action="store_true",
                   help='load HF models with attn_implementation="eager" (written-out attention, '
                        "to see canonicalization at work)")
    i.set_defaults(func=_cmd_inspect)

    ru = sub.add_parser("rules", parents=[common], help="list the rewrite rules with their papers")
    ru.add_argument("--json", action="store_true", help="print the rules (and their options' schema) as JSON")
    ru.set_defaults(func=_cmd_rules)

    s = sub.add_parser("schema", parents=[common], help="print the recipe JSON Schema")
    s.set_defaults(func=_cmd_schema)

    m = sub.add_parser("models", parents=[common], help="list registered model names")
    m.add_argument("--json", action="store_true", help="print {name: description} as JSON")
    m.set_defaults(func=_cmd_models)

    e = sub.add_parser("eval", parents=[common, saved],
                       help="re-measure a saved model against its base model",
                       description="Rebuild a saved model (rewriter.load), run it and its base on text, and "
                                   "print the recipe's gate metric per kind of text and length, the worst "
                                   "deciding. Without --text: the recipe's own held-out text.")
    e.add_argument("--text", metavar="TEXT", help="kinds of text, held-out side (bundled, pydoc, python, "
                   "legal, mix, or a '+'-joined mix such as pydoc+python), or a .txt (paragraphs, or one "
                   "sample per line) or .jsonl ({\"text\": ...} per line) file, all of it")
    e.add_argument("--lengths", metavar="N,N", help="token lengths to measure at "
                   "(default: the recipe's calibration lengths)")
    e.add_argument("--samples", type=_positive_int, metavar="N", help="at most N samples (sentences, or "
                   "chunks of the recipe's seq_len tokens; default: the recipe's samples + heldout)")
    e.add_argument("--json", action="store_true", help="print the measurement as JSON")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", parents=[common, saved], help="export a saved model to ONNX",
                       description="Rebuild a saved model (rewriter.load) and export it with "
                                   "OptimizedModel.export_onnx: batch and length stay dynamic.")
    x.add_argument("--onnx", metavar="FILE", required=True, help="the .onnx file to write")
    x.set_defaults(func=_cmd_export)

    g = sub.add_parser("generate", parents=[common, saved],
                       help="generate text with a saved causal LM, streamed",
                       description="Rebuild a saved model (rewriter.load) and continue the prompt with "
                                   "OptimizedModel.generate (greedy unless --sample), printing tokens as "
                                   "they come.")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N",
                   help="at most N new tokens (default 64)")
    g.add_argument("--sample", action="store_true", help="sample (with --temperature, --top-k, --top-p) "
                   "instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=_positive_int, default=None, metavar="K")
    g.add_argument("--top-p", type=float, default=None, metavar="P")
    g.add_argument("--compile", action="store_true", help="run the decode steps through torch.compile "
                   "(inductor): the first step compiles, the later ones run faster")
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", parents=[common, saved],
                       help="time a saved model against its base across sequence lengths",
                       description="Rebuild a saved model (rewriter.load) and its base, time both "
                                   "interleaved at each length (median of --repeats calls after a warm-up) "
                                   "and print the measured speed-up beside the cost model's prediction "
                                   "(whole-model FLOPs before / after, rewriter.cost); --png plots latency "
                                   "against length.")
    b.add_argument("--seq", metavar="N,N,...", help="sequence lengths (default: the recipe's "
                   "seq_len × 1, 4, 16, up to the model's position limit)")
    b.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="rows per call (default 1)")
    b.add_argument("--repeats", type=_positive_int, default=3, metavar="R", help="timed calls per model and "
                   "length (default 3)")
    b.add_argument("--png", metavar="FILE", help="write a plot of latency against length (PNG)")
    b.add_argument("--json", action="store_true", help="print the table as JSON")
    b.set_defaults(func=_cmd_bench)
    return p


def _lengths(text: str, flag: str = "--seq") -> list[int]:
    """'128,512,2048' → [128, 512, 2048] (positive integers, each once, ascending); a usage error
    (one line, exit 2) names the flag and the part that is not one."""
    out = []
    for part in text.split(","):
        try:
            n = int(part.strip())
        except ValueError:
            raise _Failure(f"{flag} {text}: expected comma-separated positive integers such as 128,512,2048; "
                           f"{part.strip()!r} is not an integer", EXIT_USAGE) from None
        if n <= 0:
            raise _Failure(f"{flag} {text}: lengths must be positive, got {n}", EXIT_USAGE)
        out.append(n)
    return sorted(set(out))


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("rewriter")
    except PackageNotFoundError:
        return "(not installed)"


def _console(stderr: bool = False):
    import shutil

    from rich.console import Console
    # piped output (CI logs, `| less`) has no terminal width: use a readable one instead of rich's 80
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size((140, 40)).columns, 140)
    return Console(stderr=stderr, highlight=False, width=width)


@contextlib.contextmanager
def rich_progress(title: str):
    """A live bar and one line per decision on stderr; yields the driver's on_record callback."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress
    console = Console(stderr=True, highlight=False)
    colors = {"applied": "green", "rolled_back": "red", "error": "red", "rejected": "yellow"}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(escape(title), total=None)

        def on_record(r) -> None:
            where = f"site {r.site}" if len(r.sites) <= 1 else f"sites {', '.join(map(str, r.sites))}"
            console.print(f"  {r.rule} {where} ({escape(str(r.module))}): [{colors.get(r.status, 'dim')}]{r.status}[/]"
                          f" — {escape(str(r.reason))} [dim]({r.seconds:.1f} s)[/dim]")
            bar.advance(task)
        yield on_record


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _load(spec: str, **kw):
    """rewriter.models.load_model, with the errors a user can cause turned into exit status 2."""
    from .models import load_model
    try:
        return load_model(spec, **kw)
    except (ValueError, LookupError, ImportError, AttributeError, OSError) as e:
        raise _Failure(f"cannot load model {spec!r}: {e}", EXIT_USAGE) from e
    except TypeError as e:          # an option this loader does not take (--max-memory for a tiny model)
        if "unexpected keyword" not in str(e):
            raise
        opts = ", ".join(f"--{k.replace('_', '-')}" for k in kw)
        raise _Failure(f"cannot load model {spec!r} with {opts}: its loader does not take it ({e})",
                       EXIT_USAGE) from e


# ---- commands ------------------------------------------------------------------------------------

def _cmd_run(args) -> int:
    from . import distributed
    from .recipe import RecipeError, load_recipe

    recipe = load_recipe(args.recipe)          # validate before anything slow happens
    spec = args.model or recipe.model
    if not spec:
        raise _Failure(f"{args.recipe}: the recipe names no `model:`; pass one with --model", EXIT_USAGE)
    try:
        in_env = distributed.env_world_size()
    except ValueError as e:
        raise _Failure(str(e), EXIT_USAGE) from e
    if args.nproc is not None and in_env > 1:
        raise _Failure(f"--nproc {args.nproc}: this process is already one of WORLD_SIZE={in_env} ranks "
                       "(torchrun); use --nproc or torchrun, not both", EXIT_USAGE)
    if args.nproc is not None and args.nproc > 1:
        return _launch(args)
    try:
        world = distributed.init_from_env()
    except ValueError as e:
        raise _Failure(str(e), EXIT_USAGE) from e
    try:
        return _run_rank(args, recipe, spec, world)
    finally:
        distributed.close()


def _launch(args) -> int:
    """`run --nproc N`: N ranks of this very command (without --nproc), then their exit status."""
    from . import distributed
    argv = ["run", args.recipe, *(["--model", args.model] if args.model else []),
            *(["--output", args.output] if args.output else []), *(["--json"] if args.json else []),
            *(["--debug"] if args.debug else []),
            *(["--max-memory", args.max_memory] if args.max_memory else [])]
    code, codes = distributed.launch(args.nproc, argv)
    if code:
        failed = [f"rank {r} exited with status {c}" for r, c in enumerate(codes) if c not in (0, None)]
        stopped = [f"rank {r} was stopped" for r, c in enumerate(codes) if c is None]
        _error(f"--nproc {args.nproc}: " + ", ".join(failed + stopped))
    return code


def _run_rank(args, recipe, spec: str, world) -> int:
    """One process's run (rank 0 of 1, or one rank of a data-parallel run: only rank 0 talks)."""
    from .recipe import RecipeError
    talk = world.rank == 0
    err = _console(stderr=True)
    if not args.json and talk:
        n = "" if world.single else f" ({world.size} processes)"
        err.print(f"loading {spec} …{n}", markup=False)
    loaded = _load(spec, **({"max_memory": args.max_memory} if args.max_memory else {}))
    from .api import optimize
    if args.model:                   # the saved recipe must name the model actually used
        recipe = dataclasses.replace(recipe, model=args.model)
    import io
    # the other ranks stay quiet: no progress, and what a rule draws on stdout (a fit's bar) goes nowhere
    quiet = contextlib.nullcontext() if talk else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            opt = optimize(loaded, recipe=recipe, progress=not args.json and talk)
    except (ValueError, OSError) as e:  # no attention sites, unreadable calibration text, ...
        if isinstance(e, RecipeError):
            raise
        raise _Failure(f"{loaded.name}: {e}", EXIT_FAILED) from e
    if not talk:                     # rank 0 saves and prints
        return EXIT_OK

    output = args.output or recipe.output
    saved = str(opt.save(output)) if output else None
    if args.json:
        _print_json({**opt.report.to_dict(), "output": saved})
        return EXIT_OK
    opt.report.render(_console())
    if saved:
        err.print(f"saved to {saved}  (reload with rewriter.load({saved!r}))", markup=False)
    else:
        err.print("not saved: the recipe has no `output:` and no --output was given", markup=False)
    return EXIT_OK


def _cmd_inspect(args) -> int:
    from collections import Counter

    from rich import box
    from rich.markup import escape
    from rich.table import Table

    loaded = _load(args.model, **({"attn_implementation": "eager"} if args.eager else {}))
    from .api import inspect
    example = loaded.example_inputs(batch=2, seq_len=args.seq_len) if args.seq_len else None
    sites = inspect(loaded, example_inputs=example)
    notes = list(getattr(sites, "notes", []))
    canonicalized = list(getattr(sites, "canonicalized", []))
    if args.json:
        _print_json({"model": loaded.name, "kind": loaded.kind, "sites": [s.to_dict() for s in sites],
                     "canonicalized": canonicalized, "notes": notes})
        return EXIT_OK

    out = _console()
    if not sites:
        out.print(f"[bold]{escape(loaded.name)}[/bold] ({loaded.kind}): no attention sites found")
        for n in notes or ["(the analyzer left no note)"]:
            out.print(f"  {escape(n)}")
        return EXIT_OK
    t = Table(title=f"{escape(loaded.name)} ({loaded.kind}): {len(sites)} attention sites",
              box=box.SIMPLE_HEAD, title_justify="left")
    widths = {"module": max(len(s.module) for s in sites), "mask": max(len(s.mask) for s in sites)}
    for col in ("#", "module", "heads", "kv", "dim", "mask", "pos", "norm"):
        t.add_column(col, min_width=widths.get(col), overflow="fold",
                     justify="right" if col in ("#", "heads", "kv", "dim") else "left")
    for s in sites:
        t.add_row(str(s.index), escape(s.module), str(s.heads), str(s.kv_heads), str(s.head_dim),
                  s.mask, s.positional or "-", s.norm)
    out.print(t)
    out.print("[dim]kv: key/value heads (fewer than heads: GQA/MQA); dim: head dim; pos: positional "
              "encoding applied inside attention; norm: pre- or post-norm block[/dim]")
    forms = Counter(c.get("form", "?") if isinstance(c, dict) else str(c) for c in canonicalized)
    for form, n in forms.items():
        out.print(f"canonicalized {n} written-out attention{'s' if n > 1 else ''} to "
                  f"scaled_dot_product_attention: {escape(form)}")
    for n in notes:
        out.print(f"[dim]note: {escape(n)}[/dim]")
    return EXIT_OK


def _cmd_rules(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .rule import all_rules

    rules = all_rules()
    if args.json:
        _print_json([{"name": r.name, "exact": r.exact, "kind": r.kind, "paper": r.paper,
                      "summary": r.summary, "options": r.options.model_json_schema()}
                     for r in rules.values()])
        return EXIT_OK
    t = Table(title=f"{len(rules)} rewrite rules", show_lines=True)
    t.add_column("rule", no_wrap=True)
    t.add_column("exact?", no_wrap=True)
    t.add_column("what it does  [dim](paper)[/dim]", ratio=3)
    t.add_column("options", ratio=1)
    for r in rules.values():
        t.add_row(r.name, "exact" if r.exact else "approximate\n(gated)",
                  f"{escape(r.summary)}\n[dim]{escape(r.paper)}[/dim]", "\n".join(r.options.model_fields))
    _console().print(t)
    return EXIT_OK


def _cmd_schema(args) -> int:
    from .recipe import recipe_schema
    _print_json(recipe_schema())
    return EXIT_OK


def _cmd_models(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .models import registered

    names = registered()
    if args.json:
        _print_json(names)
        return EXIT_OK
    t = Table(title="registered models (or pass an HF folder, or \"module:function\")")
    t.add_column("name", no_wrap=True)
    t.add_column("description", overflow="fold")
    for name, desc in names.items():
        t.add_row(name, escape(desc))
    _console().print(t)
    return EXIT_OK


def _load_saved(path: str, trust_code: bool):
    """rewriter.load of a saved folder; a folder that is not one is a usage error (exit 2)."""
    from .api import load
    folder = Path(path)
    if not (folder / "records.json").is_file():
        raise _Failure(f"{path}: not a saved model (no records.json); save one with OptimizedModel.save or "
                       f"`rewriter run`", EXIT_USAGE)
    try:
        return load(folder, trust_code=trust_code)
    except (LookupError, ImportError, OSError) as e:
        raise _Failure(f"{path}: cannot rebuild the saved model: {e}", EXIT_USAGE) from e


def _cmd_eval(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from .gate import Gate
    from .models import evaluation_batches, judged_lengths, make_calibration
    from .recipe import default_gate

    asked = _lengths(args.lengths, "--lengths") if args.lengths is not None else None   # before the load
    opt = _load_saved(args.saved, args.trust_code)
    loaded, spec = opt.io, opt.recipe.calibration
    gate_spec = opt.recipe.gate or default_gate(loaded.kind)
    samples = args.samples or spec.samples + spec.heldout
    lengths = asked or spec.lengths
    try:
        if args.text and Path(args.text).suffix.lower() in (".txt", ".jsonl"):
            batches, labels = [], []
            for n in judged_lengths(loaded, spec.seq_len, lengths):
                part = evaluation_batches(loaded, args.text, samples, n, spec.batch_size)
                batches, labels = batches + part, labels + [(Path(args.text).name, n)] * len(part)
            source = args.text
        else:
            held = args.samples or spec.heldout or spec.samples
            cal = make_calibration(loaded, **{**spec.resolved(opt.recipe.steps), "heldout": held,
                                              "samples": 1, "validation": 0, "lengths": lengths,
                                              "text": args.text or spec.text})
            batches, labels = cal.heldout, cal.heldout_labels
            source = f"{cal.source} (held out)"
    except (ValueError, OSError) as e:
        raise _Failure(f"{args.saved}: {e}", EXIT_USAGE) from e
    base = loaded.model.eval()      # the base this process loaded (its weights shared with the saved model)
    m = Gate.from_model(gate_spec, base, batches, loaded, labels).measure(opt.graph_module)
    bound = {k: v for k, v in gate_spec.model_dump(exclude_none=True).items() if k != "metric"}
    rows = sum(int(next(v for v in b.values() if hasattr(v, "shape")).shape[0]) for b in batches)
    result = {"saved": args.saved, "model": loaded.name, "text": source, "samples": rows, "metric": m.metric,
              "value": m.value, "worst": m.worst, "bound": bound, "ok": m.ok, "why": m.why, "groups": m.groups}
    if args.json:
        _print_json(result)
        return EXIT_OK if m.ok else EXIT_FAILED
    t = Table(title=f"{escape(args.saved)} against its base {escape(loaded.name)}", title_justify="left")
    for col in ("text", "samples", "metric", "value", "worst", "bound", "within bound"):
        t.add_column(col, justify="right" if col in ("samples", "value", "worst") else "left")
    worst = "-" if m.worst is None else f"{m.worst:.4f}"
    t.add_row(escape(source), str(rows), m.metric, f"{m.value:.4f}", worst,
              escape(", ".join(f"{k} {v}" for k, v in bound.items())),
              "[green]yes[/]" if m.ok else f"[red]no[/]: {escape(m.why)}")
    for g in m.groups:     # per kind of text and length; the worst one is the row above
        t.add_row(f"  {escape(g['text'])} at {g['tokens']} tokens", "", "", f"{g['value']:.4f}",
                  "-" if g["worst"] is None else f"{g['worst']:.4f}", "",
                  "[green]yes[/]" if g["ok"] else f"[red]no[/]: {escape(g['why'])}")
    _console().print(t)
    return EXIT_OK if m.ok else EXIT_FAILED


def _cmd_export(args) -> int:
    opt = _load_saved(args.saved, args.trust_code)
    path = opt.export_onnx(args.onnx)
    names = ", ".join(list(opt.example[1]) or [f"args[{i}]" for i in range(len(opt.example[0]))])
    _console(stderr=True).print(f"wrote {path} (inputs: {names}; batch and length dynamic)", markup=False)
    return EXIT_OK


def bench(opt, lengths: list[int] | None = None, batch: int = 1, repeats: int = 3) -> dict:
    """Latency of a rebuilt OptimizedModel and its base model at each length, interleaved
    (report.latency_ms), with the predicted speed-up (whole-model FLOPs before / after: the saved
    report's, else counted now). ValueError names a length beyond the model's position limit."""
    from . import cost as C
    from .api import _prepare
    from .report import crossover, latency_ms, stretch, sweep_lengths
    loaded, gm = opt.io, opt.graph_module
    args, kwargs = opt.example
    example = dict(zip(opt.__dict__["_inputs"].arg_names, args)) | dict(kwargs)
    saved = opt.report.flops_per_token
    if saved:                        # the whole-model count saved with the report, per token
        symbols = C.find_symbols(gm)
        before, after = (saved[k] * C.N for k in ("before", "after"))
    else:                            # a report saved before the whole-model count: count it now
        whole = C.model_cost(_prepare(loaded, example)[0], gm)
        symbols, before, after = whole.before.symbols, whole.before.total, whole.after.total
    seq_dims = C.seq_inputs(gm, symbols)
    limits = {**getattr(loaded, "max_positions", {})}
    bound = C.seq_limit(gm, symbols)
    limit = min([*limits.values(), *([bound] if bound else [])], default=None)
    lengths = lengths or sweep_lengths(opt.recipe.calibration.seq_len, limit)
    if not seq_dims:
        raise ValueError("the model's inputs have no sequence dim (its attention length is fixed): "
                         "there is no length to vary")
    if limit is not None and lengths[-1] > limit:
        what = ", ".join(f"{k} takes at most {v}" for k, v in limits.items()) or "torch.export's bound"
        raise ValueError(f"--seq {lengths[-1]}: longer than the model's position limit of {limit} tokens "
                         f"({what})")
    base = loaded.model.eval()      # the base this process loaded (its weights shared with the saved model)
    rows = []
    for n in lengths:
        inputs = stretch(example, n, seq_dims, rows=batch, batched=C.batch_inputs(gm, symbols))
        b, a = latency_ms([base, opt], inputs, repeats)
        f_b, f_a = (float(e.subs(C.N, n)) for e in (before, after))
        rows.append({"seq_len": n, "batch": batch, "before_ms": b, "after_ms": a, "speedup": b / a,
                     "predicted_speedup": round(f_b / f_a, 4) if f_a > 0 else None})
    return {"model": loaded.name, "rows": rows, "crossover": crossover(rows), "position_limit": limit}


def _plot(result: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    xs = [r["seq_len"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(xs, [r["before_ms"] for r in rows], "o-", label="original")
    ax.plot(xs, [r["after_ms"] for r in rows], "s-", label="rewritten")
    pred = [(r["seq_len"], r["before_ms"] / r["predicted_speedup"]) for r in rows
            if r.get("predicted_speedup")]
    if pred:
        ax.plot(*zip(*pred), "x--", color="gray", label="rewritten, predicted (FLOPs)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"sequence length (tokens), batch {rows[0]['batch']}")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd_bench(args) -> int:
    from rich.markup import escape
    from rich.table import Table
    lengths = _lengths(args.seq) if args.seq is not None else None      # before the slow load
    opt = _load_saved(args.saved, args.trust_code)
    try:
        result = bench(opt, lengths, args.batch, args.repeats)
    except ValueError as e:
        raise _Failure(f"{args.saved}: {e}", EXIT_USAGE) from e
    if args.png:
        _plot(result, args.png, f"{args.saved} against {result['model']}")
        result["png"] = args.png
    if args.json:
        _print_json(result)
        return EXIT_OK
    t = Table(title=f"{escape(args.saved)} against its base {escape(result['model'])} "
                    f"(batch {args.batch}, median of {args.repeats})", title_justify="left")
    for col in ("length", "before ms", "after ms", "measured ×", "predicted ×"):
        t.add_column(col, justify="right")
    for r in result["rows"]:
        p = r["predicted_speedup"]
        t.add_row(str(r["seq_len"]), f"{r['before_ms']:.1f}", f"{r['after_ms']:.1f}",
                  f"{'[red]' if r['speedup'] < 1 else ''}{r['speedup']:.2f}×",
                  "-" if p is None else f"{p:.2f}×")
    out = _console()
    out.print(t)
    c = result["crossover"]
    out.print(f"the rewrite pays from {c['seq_len']} tokens ({c['why']})" if c["seq_len"] else
              f"the rewrite does not pay at the measured lengths ({c['why']})", markup=False)
    if args.png:
        _console(stderr=True).print(f"wrote {args.png}", markup=False)
    return EXIT_OK


class _TextStreamer:
    """Prints a generation as it comes: the prompt, then the new text (decoded in full each step, so
    a character split over several tokens prints once it is whole)."""

    def __init__(self, tokenizer, out):
        self.tok, self.out, self.ids, self.shown, self.prompt = tokenizer, out, [], "", True

    def put(self, tokens) -> None:
        if self.prompt:                      # the first put is the prompt, as transformers' streamers get it
            self.prompt = False
            return
        self.ids += [int(t) for t in tokens.reshape(-1)]
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _cmd_generate(args) -> int:
    from .generate import GenerationError
    opt = _load_saved(args.saved, args.trust_code)
    tok = getattr(opt.io, "tokenizer", None)
    if tok is None:
        raise _Failure(f"{args.saved}: the model has no tokenizer to turn --prompt into token ids",
                       EXIT_USAGE)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    sys.stdout.write(args.prompt)
    try:
        opt.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     streamer=_TextStreamer(tok, sys.stdout), compile=args.compile)
    except GenerationError as e:
        sys.stdout.write("\n")
        raise _Failure(f"{args.saved}: {e}", EXIT_FAILED) from e
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
