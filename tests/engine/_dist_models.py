"""Models for tests/engine/test_distributed.py, loaded by the ranks as "_dist_models:<function>"."""
import os

import torch


def fails_on_rank1():
    """The tiny Llama, whose forward raises on rank 1 of a data-parallel run (never while torch.export
    traces it): rank 1's share of the gate's reference outputs fails, rank 0's does not."""
    from rewriter.models import load_model
    loaded = load_model("llama")

    def hook(module, args, kwargs):
        if os.environ.get("RANK") == "1" and not torch.compiler.is_exporting():
            raise RuntimeError("injected failure on rank 1")
    loaded.model.register_forward_pre_hook(hook, with_kwargs=True)
    return loaded
