"""rewriter: a compiler-style graph-rewriting optimizer for PyTorch transformer models.

    from rewriter import optimize, inspect, load
    opt = optimize(model, recipe="examples/recipes/minilm-drop.yaml")
"""
from .rule import Rule, StepOptions, all_rules, get_rule, register
from .site import AttentionSite

__all__ = ["optimize", "inspect", "load", "AttentionSite", "Rule", "StepOptions", "all_rules", "get_rule",
           "register", "OptimizedModel", "InputError", "ArtifactError"]
__version__ = "0.1.0"


def __getattr__(name):  # the API pulls in torch.export & transformers: import it on first use
    if name in ("optimize", "inspect", "load", "OptimizedModel", "InputError"):
        from . import api
        return getattr(api, name)
    if name == "ArtifactError":
        from .artifact import ArtifactError
        return ArtifactError
    raise AttributeError(f"module 'rewriter' has no attribute {name!r}")
