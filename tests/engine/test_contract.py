"""The rule contract end to end: import directions, candidates and their records, the driver's
verbs for every rule (order: damage, max_applied), built-in rules registered through the entry point
third-party rules use, and rewritten or reloaded graphs that call no rule helper."""
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from rewriter import load, optimize
from rewriter.rule import Candidate

ROOT = Path(__file__).resolve().parents[2]
FACE = {"api.py", "cli.py", "__init__.py"}
OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
CAL = {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules a file imports (relative imports resolved against `package`)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _folder_imports(folder: str, package: str, skip=()) -> dict[str, set[str]]:
    found = {}
    for f in sorted((ROOT / folder).rglob("*.py")):
        if f.name in skip and f.parent == ROOT / folder:
            continue
        sub = ".".join(f.relative_to(ROOT / folder).parent.parts)
        found[str(f.relative_to(ROOT))] = _imports(f, f"{package}.{sub}" if sub else package)
    return found


def _offending(found: dict[str, set[str]], banned: tuple[str, ...]) -> dict[str, list[str]]:
    hits = {f: sorted(m for m in mods if m.startswith(banned)) for f, mods in found.items()}
    return {f: m for f, m in hits.items() if m}


def test_engine_core_imports_neither_models_nor_patterns():
    found = _folder_imports("rewriter", "rewriter", skip=FACE)
    assert found, "no engine files found"
    assert _offending(found, ("rewriter.models", "rewriter.patterns", "models", "patterns")) == {}


def test_kernels_import_nothing_of_ours_but_kernels():
    found = _folder_imports("kernels", "rewriter.kernels")
    ours = ("rewriter.models", "rewriter.patterns", "rewriter.api", "rewriter.driver", "rewriter.gate",
            "rewriter.analyze", "rewriter.canonicalize", "rewriter.rule", "rewriter.graph")
    assert _offending(found, ours) == {}


def test_patterns_and_models_point_one_way():
    assert _offending(_folder_imports("patterns", "rewriter.patterns"), ("rewriter.models",)) == {}
    assert _offending(_folder_imports("models", "rewriter.models"), ("rewriter.patterns",)) == {}


def test_import_scan_sees_a_banned_import(tmp_path):
    """The scan itself: a relative import of the model zoo from an engine module is caught."""
    f = tmp_path / "bad.py"
    f.write_text("from .models import load_model\nimport torch\n")
    assert _offending({"bad.py": _imports(f, "rewriter")}, ("rewriter.models",)) == {
        "bad.py": ["rewriter.models", "rewriter.models.load_model"]}


def test_builtin_rules_register_through_the_entry_point():
    """Nothing imports rewriter.patterns here: the rules arrive the way a third-party package's would."""
    code = ("import sys; from rewriter.rule import all_rules; names = sorted(all_rules()); "
            "print(','.join(names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    names = out.stdout.strip().split(",")
    assert {"drop_attention", "masa", "linear_attention", "block_routing", "causal_fastpath"} <= set(names)


def test_sites_and_candidates_are_frozen(bert):
    from rewriter import inspect
    site = inspect(bert)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.mask = "none"
    c = Candidate((site,), {"importance": 0.1})
    with pytest.raises(TypeError):
        c.facts["importance"] = 0.2
    assert c.site is site and c.indices == [site.index]


# one step per built-in rule, on a tiny model it applies to
EVERY_RULE = [
    ("bert", {"drop_attention": {"max_applied": 1}}),
    ("bert", {"drop_block": {"max_applied": 1}}),
    ("bert", {"linear_attention": {"steps": 2, "feature_dim": 8}}),
    ("bert", {"agent_attention": {"agents": 4}}),
    ("llama", {"block_routing": {"block_size": 8}}),
    ("llama", {"kmeans_routing": {"clusters": 3}}),
    ("llama", {"masa": {"atoms": 0.5}}),
    ("llama", {"causal_fastpath": {}}),
    ("vit", {"normlin": {"distill_steps": 2}}),
]


def _call_targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _pattern_calls(gm) -> list[str]:
    return [f"{t.__module__}.{t.__name__}" for t in _call_targets(gm)
            if str(getattr(t, "__module__", "")).startswith("rewriter.patterns")]


@pytest.mark.parametrize("model, step", EVERY_RULE, ids=[next(iter(s)) for _, s in EVERY_RULE])
def test_rewritten_and_reloaded_graphs_call_no_rule_helper(model, step, request, tmp_path):
    loaded = request.getfixturevalue(model)
    opt = optimize(loaded, {"calibration": CAL, "gate": OPEN_GATE, "steps": [step]}, progress=False,
                   measure_latency=False)
    assert any(r.status == "applied" for r in opt.records), [(r.status, r.reason) for r in opt.records]
    assert _pattern_calls(opt.graph_module) == []
    opt.save(tmp_path / "m")
    again = load(tmp_path / "m", model=loaded)
    assert _pattern_calls(again.graph_module) == []
    assert [(r.rule, r.sites, r.status) for r in again.records] == [(r.rule, r.sites, r.status) for r in opt.records]


def test_a_group_decision_names_every_site(llama):
    opt = optimize(llama, {"calibration": CAL, "gate": OPEN_GATE, "steps": [{"masa": {"atoms": 0.5}}]},
                   progress=False, measure_latency=False)
    (r,) = opt.records
    assert r.status == "applied" and r.sites == (0, 1, 2, 3) and r.info["group"] == [0, 1, 2, 3]
    assert r.modules == tuple(s.module for s in opt.sites)
    assert r.to_dict()["sites"] == [0, 1, 2, 3] and r.to_dict()["site"] == 0


def test_order_damage_ranks_any_rule_by_trial(bert):
    """order: damage is the driver's: every candidate is tried alone and undone, then the least
    damaging go first; the record keeps what was measured."""
    opt = optimize(bert, {"calibration": CAL, "gate": OPEN_GATE,
                          "steps": [{"agent_attention": {"agents": 4, "order": "damage"}}]},
                   progress=False, measure_latency=False)
    damage = [r.info["damage_alone"] for r in opt.records]
    assert len(damage) == 4 and damage == sorted(damage) and damage[0] > 0
    assert sorted(r.site for r in opt.records) == [0, 1, 2, 3]


def test_max_applied_limits_every_rule_and_max_layers_is_its_alias(bert):
    for key in ("max_applied", "max_layers"):
        opt = optimize(bert, {"calibration": CAL, "gate": OPEN_GATE,
                              "steps": [{"agent_attention": {"agents": 4, key: 2}}]},
                       progress=False, measure_latency=False)
        statuses = [r.status for r in opt.records]
        assert statuses == ["applied", "applied", "skipped", "skipped"]
        assert all(f"{key}=2 already applied" in r.reason for r in opt.records[2:])


def test_progress_reaches_a_callback_per_decision(bert):
    seen = []
    opt = optimize(bert, {"calibration": CAL, "gate": OPEN_GATE, "steps": [{"agent_attention": {"agents": 4}}]},
                   progress=seen.append, measure_latency=False)
    assert seen == opt.records and all(r.status == "applied" for r in seen)


def test_error_records_carry_the_traceback_as_a_field(bert):
    from rewriter.rule import RULES, Rule, StepOptions, register

    def boom(gm, c, built, opts):
        raise RuntimeError("edit failed")
    if "_contract_boom" not in RULES:
        register(Rule("_contract_boom", paper="test", summary="test", exact=False, options=StepOptions,
                      check=lambda c, o: None, build=lambda ctx, c, o: {}, apply=boom))
    opt = optimize(bert, {"calibration": CAL, "gate": OPEN_GATE, "steps": [{"_contract_boom": {"layers": [0]}}]},
                   progress=False, measure_latency=False)
    (r,) = opt.records
    assert r.status == "error" and r.reason == "RuntimeError: edit failed"
    assert "Traceback" in r.traceback and "edit failed" in r.traceback
    assert "traceback" not in r.to_dict()          # saved records stay plain data


def test_the_readme_example_rule_works_as_a_third_party_rule(bert, llama):
    """examples/rules/local_window.py (the README's "Writing a rule"): exact when the window covers
    the sequence, gated out when it is too narrow, refused on causal sites with its reason."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("local_window", ROOT / "examples" / "rules" / "local_window.py")
    if "local_window" not in __import__("rewriter.rule", fromlist=["RULES"]).RULES:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    wide = optimize(bert, {"calibration": CAL, "gate": {"metric": "relative_rms", "max": 1e-5},
                           "steps": [{"local_window": {"window": 64}}]}, progress=False, measure_latency=False)
    assert [r.status for r in wide.records] == ["applied"] * 4
    narrow = optimize(bert, {"calibration": CAL, "gate": {"metric": "relative_rms", "max": 1e-5},
                             "steps": [{"local_window": {"window": 1}}]}, progress=False, measure_latency=False)
    assert {r.status for r in narrow.records} == {"rolled_back"}
    causal = optimize(llama, {"calibration": CAL, "gate": OPEN_GATE, "steps": [{"local_window": {}}]},
                      progress=False, measure_latency=False)
    assert {(r.status, r.reason) for r in causal.records} == {("rejected", "this example handles bidirectional attention only")}


def test_layers_match_layers_and_fall_back_to_site_indices_only_where_no_site_has_one():
    """`layers:` names blocks (site.layer); a site in no list of blocks (SigLIP's pooling head) is
    taken by all/auto only, and site indices stand in only for a model where no site has a layer."""
    from rewriter.rule import StepOptions
    from rewriter.site import AttentionSite
    site = lambda i, layer: AttentionSite(index=i, node=f"sdpa_{i}", module=f"m{i}", layer=layer,  # noqa: E731
                                          heads=2, kv_heads=2, head_dim=4, scale=0.5, mask="none")
    vision = [site(0, 0), site(1, 1), site(2, None)]          # two encoder blocks and a pooling head
    pick = lambda layers, sites: [s.index for s in sites if StepOptions(layers=layers).selects(s, sites)]  # noqa: E731
    assert pick([2], vision) == [] and pick([1], vision) == [1] and pick("all", vision) == [0, 1, 2]
    custom = [site(0, None), site(1, None)]                    # attention in no numbered list at all
    assert pick([1], custom) == [1] and pick("0-1", custom) == [0, 1]
