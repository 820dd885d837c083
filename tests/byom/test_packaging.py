"""The wheel holds the whole package: built from this checkout, installed into a fresh virtual
environment that sees the dependencies (torch, transformers, the model packages) but nothing of ours
except the wheel, it lists the rules and optimizes a tiny model with a rule whose run-time op lives in
its own kernels/ folder (causal_fastpath: rewriter.kernels.causal_attention, left out of hand-listed
package lists before)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("rewriter", "__editable__", "__editable___rewriter")


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_alone_and_runs(tmp_path):
    # built from a copy of the sources, so that no build/ folder of an earlier build adds stale files
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache",
                                  "tests", "benchmarks", "out")
    shutil.copytree(ROOT, src, ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(src)])
    wheel, = (tmp_path / "dist").glob("rewriter-*.whl")

    # the dependencies, through a folder of links to this environment's packages minus ours (the
    # editable install's finder, .pth and metadata are left out, so only the wheel can provide rewriter)
    deps = tmp_path / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(OURS) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    where = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    new_site = Path(where.stdout.strip())
    (new_site / "zz_deps.pth").write_text(str(deps) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    rules = _run([str(venv / "bin" / "rewriter"), "rules", "--json"], cwd=tmp_path, env=env).stdout
    for name in ("drop_attention", "masa", "linear_attention", "block_routing", "causal_fastpath", "normlin"):
        assert f'"name": "{name}"' in rules
    script = textwrap.dedent(f"""
        import warnings; warnings.simplefilter("ignore")
        import rewriter, rewriter.kernels.causal_attention, rewriter.models
        assert rewriter.__file__.startswith({str(venv)!r}), rewriter.__file__
        assert rewriter.kernels.causal_attention.__file__.startswith({str(venv)!r})
        from rewriter import optimize
        recipe = {{"calibration": {{"samples": 2, "seq_len": 8, "batch_size": 2, "heldout": 0}},
                   "steps": [{{"causal_fastpath": {{}}}}]}}
        opt = optimize("llama", recipe, progress=False, measure_latency=False)
        print("statuses", sorted({{r.status for r in opt.records}}))
    """)
    out = _run([str(py), "-c", script], cwd=tmp_path, env=env).stdout
    assert "statuses ['applied']" in out, out
