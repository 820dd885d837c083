"""Data-parallel calibration (rewriter/distributed.py): `rewriter run --nproc 2` gives the same records
(status, reasons, metrics, facts) and bit-identical saved tensors as the one-process run of the same
recipe, per family of data-using rule: LLM-Drop importance gated by perplexity on a tiny decoder
(per-token NLLs gathered), hedgehog attention transfer fitted by Adam on gathered activations
with its damage ranking (`layers: auto`), MASA / k-means / routing-budget fits, and an encoder gated
by embedding cosine with drop's mean compensation and calibrated agent attention. Both sides run
1 torch thread per process (CPU reductions split work by thread count). Also: a rank that fails
makes every rank fail naming it; a bad `--nproc` names the flag; the World primitives."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rewriter.distributed import DistributedError, World, free_port

HERE = Path(__file__).parent

RECIPES = {
    "decoder-drop-perplexity": {
        "model": "llama",
        "calibration": {"samples": 8, "seq_len": 16, "batch_size": 2, "heldout": 4},
        "gate": {"metric": "perplexity_ratio", "max": 1.5},
        "steps": [{"drop_attention": {"max_layers": 2}}]},
    "decoder-fits": {      # hedgehog Adam fit + damage order, MASA, k-means centroids, per-head budgets
        "model": "llama",
        "calibration": {"samples": 4, "seq_len": 16, "batch_size": 2, "heldout": 2, "validation": 2},
        "gate": {"metric": "relative_rms", "max": 100.0},
        "steps": [{"masa": {}},
                  {"linear_attention": {"feature_map": "hedgehog", "steps": 10, "window": 4,
                                        "layers": "auto", "max_applied": 1}},
                  {"kmeans_routing": {"layers": [2, 3], "max_applied": 1}},
                  {"block_routing": {"block_size": 4, "keep": 0.5, "budget": "heads"}}]},
    "encoder-cosine": {
        "model": "bert",
        "calibration": {"samples": 8, "seq_len": 16, "batch_size": 2, "heldout": 4, "validation": 4},
        "gate": {"metric": "embedding_cosine", "min": 0.5},
        "steps": [{"drop_attention": {"max_layers": 1, "compensate": "mean"}},
                  {"agent_attention": {"agents": 4, "calibrate": True, "steps": 5, "layers": [2, 3]}}]},
}


EXPECT_FITTED = {"decoder-drop-perplexity": set(),       # drop without compensation: nothing fitted
                 "decoder-fits": {"masa", "linear_attention", "kmeans_routing"},
                 "encoder-cosine": {"drop_attention", "agent_attention"}}   # mean shift, agent scales


def _untimed(x):
    """`x` without wall-clock times, resident memory, the output path and what differs by design
    between the runs: the process count, the report note that states it, the latency timings and
    the activation cache's counts (each rank caches its own batches)."""
    drop = {"seconds", "latency", "memory", "output", "world_size", "notes", "cache"}
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in drop and not k.endswith("_seconds")}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _cli(*args: str, env: dict | None = None, timeout: int = 600, torchrun: int | None = None
         ) -> subprocess.CompletedProcess:
    """`python -m rewriter *args` (or under `torchrun --nproc_per_node N -m rewriter`), 1 thread per
    process, no rank variables inherited."""
    ranks = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
    env = {**{k: v for k, v in os.environ.items() if k not in ranks}, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(HERE), **(env or {})}
    cmd = [sys.executable, "-m", "rewriter"] if torchrun is None else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun), "--master_port",
        str(free_port()), "-m", "rewriter"]
    return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _run(tmp: Path, name: str, recipe: dict, nproc: int | None, torchrun: int | None = None):
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(recipe))          # JSON is YAML
    out = tmp / f"{name}-{nproc or 1}-{torchrun or 0}"
    done = _cli("run", str(path), "--output", str(out), "--json",
                *(["--nproc", str(nproc)] if nproc else []), torchrun=torchrun)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)
    return (report, json.loads((out / "records.json").read_text()),
            load_file(str(out / "tensors.safetensors")), done)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run of each recipe, made once: {name: (report, records, tensors, process)}."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            done[name] = _run(tmp_path_factory.mktemp("one"), name, RECIPES[name], None)
        return done[name]
    return get


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_processes_give_the_records_and_tensors_of_one_bit_for_bit(tmp_path, name, one_process):
    recipe = RECIPES[name]
    rep1, rec1, t1, _ = one_process(name)
    rep2, rec2, t2, done = _run(tmp_path, name, recipe, 2)
    assert rep1["world_size"] == 1 and rep2["world_size"] == 2
    assert any("2 processes shared the forward passes" in n for n in rep2["notes"])
    from rewriter.report import Report               # the rich report says it too, and reads it back
    assert Report.from_dict(rep2).world_size == 2 and "│ processes" in str(Report.from_dict(rep2))
    assert "2 (data parallel" in str(Report.from_dict(rep2)) and Report.from_dict(rep1).world_size == 1
    applied = [r for r in rec1["records"] if r["status"] == "applied"]
    assert applied, rec1["records"]                        # the comparison covers kept rewrites
    assert _untimed(rec1) == _untimed(rec2)                # records: status, reasons, metrics, facts
    assert _untimed(rep1) == _untimed(rep2)                # held-out check, params, FLOPs, calibration
    assert t1.keys() == t2.keys() and t1
    for k in t1:
        assert t1[k].dtype == t2[k].dtype and torch.equal(t1[k], t2[k]), k
    # rank 0 alone prints: one JSON report on stdout (parsed above), no rank's error on stderr
    assert "rank 1" not in done.stderr
    fitted = {r["rule"] for r in applied if r["built"]}    # rewrites that kept fitted tensors
    assert EXPECT_FITTED[name] <= fitted, fitted


def test_torchrun_gives_the_records_and_tensors_of_one_process(tmp_path, one_process):
    """`torchrun --nproc_per_node 2 -m rewriter run` (ranks from the environment) = one process."""
    recipe = RECIPES["decoder-drop-perplexity"]
    rep1, rec1, t1, _ = one_process("decoder-drop-perplexity")
    rep2, rec2, t2, _ = _run(tmp_path, "drop", recipe, None, torchrun=2)
    assert rep2["world_size"] == 2
    assert _untimed(rec1) == _untimed(rec2) and _untimed(rep1) == _untimed(rep2)
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_a_failing_rank_fails_every_rank_naming_it(tmp_path):
    """Rank 1's forward raises (a model whose forward fails on rank 1 only, tests/engine/
    _dist_models.py): both ranks stop with a DistributedError that names rank 1 and what was being
    done; the launcher exits non-zero and says which ranks failed."""
    path = tmp_path / "r.yaml"
    recipe = {**RECIPES["decoder-drop-perplexity"], "model": "_dist_models:fails_on_rank1"}
    path.write_text(json.dumps(recipe))
    done = _cli("run", str(path), "--output", str(tmp_path / "out"), "--nproc", "2", timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    lines = [x for x in done.stderr.splitlines() if x.startswith("rewriter: error:")]
    for rank in (0, 1):         # both ranks raised, each saying that rank 1 failed and why
        assert any(x.startswith(f"rewriter: error: rank {rank} of 2: ") and
                   "rank 1 of 2 failed while computing the original's outputs" in x and
                   "injected failure on rank 1" in x for x in lines), done.stderr[-3000:]
    assert "--nproc 2: rank 0 exited with status 1, rank 1 exited with status 1" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["0", "two", "-3"])
def test_a_bad_nproc_names_the_flag(tmp_path, value):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(RECIPES["decoder-drop-perplexity"]))
    done = _cli("run", str(path), "--nproc", value, timeout=60)
    assert done.returncode == 2
    assert "argument --nproc: expected a positive integer" in done.stderr and value in done.stderr


def test_nproc_inside_torchrun_is_refused_naming_both(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(RECIPES["decoder-drop-perplexity"]))
    done = _cli("run", str(path), "--nproc", "2", env={"WORLD_SIZE": "2"}, timeout=60)
    assert done.returncode == 2
    assert "--nproc 2: this process is already one of WORLD_SIZE=2 ranks" in done.stderr


# ---- the primitives, in two gloo processes ---------------------------------------------------------

_PRIMITIVES = textwrap.dedent("""
    import os, sys, json, torch
    from rewriter import distributed as D
    w = D.init_from_env()
    out = {"rank": w.rank, "size": w.size}
    items = list(range(7))
    out["mine"] = w.mine(items)
    out["shard"] = w.shard(lambda xs: [x * x for x in xs], items, "squaring")
    t = w.shard(lambda xs: [torch.full((2,), float(x)) / 3 for x in xs], items, "tensors")
    out["tensors"] = [v.tolist() for v in t]
    out["bcast"] = w.broadcast({"r": w.rank})
    out["on0"] = w.on_rank0(lambda: w.rank + 10, "rank 0 only")
    def boom(xs):
        if w.rank == 1:
            raise ValueError("bad batch")
        return xs
    try:
        w.shard(boom, items, "testing a failure")
    except D.DistributedError as e:
        out["error"], out["error_ranks"] = str(e), list(e.ranks)
    try:
        w.agree(w.rank == 0, "a decision")
    except D.DistributedError as e:
        out["disagree"] = str(e)
    w.agree(float("nan"), "a NaN metric")          # NaN equals NaN here: no error
    D.close()
    print(json.dumps(out))
""")


def test_world_primitives_in_two_gloo_processes():
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", _PRIMITIVES], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se[-3000:]
        outs.append(json.loads(so.strip().splitlines()[-1]))
    a, b = outs
    assert a["mine"] == [0, 2, 4, 6] and b["mine"] == [1, 3, 5]
    for o in outs:
        assert o["shard"] == [x * x for x in range(7)]
        assert o["tensors"] == [(torch.full((2,), float(x)) / 3).tolist() for x in range(7)]
        assert o["bcast"] == {"r": 0} and o["on0"] == 10
        assert o["error"] == "rank 1 of 2 failed while testing a failure: ValueError: bad batch"
        assert o["error_ranks"] == [1]
        assert o["disagree"] == "ranks disagree on a decision: rank 0 has True, rank 1 has False"


def test_one_process_calls_no_collective():
    """World() (size 1) is the identity: the list itself, fn(items) once, no process group needed."""
    w = World()
    items = [1, 2, 3]
    assert w.mine(items) is items
    seen = []
    assert w.shard(lambda xs: seen.append(xs) or [x + 1 for x in xs], items, "x") == [2, 3, 4]
    assert seen == [items] and seen[0] is items
    assert w.broadcast("v") == "v" and w.on_rank0(lambda: 5, "x") == 5 and w.gather(3) == [3]
    w.agree(object(), "anything")          # nothing to compare with
    with pytest.raises(DistributedError, match="rank 0 of 1 failed while x: ValueError: no"):
        World()._raise_failed(["ValueError: no"], "x")
