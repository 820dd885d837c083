import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Triton decides interpreted vs compiled when a kernel is defined (at import), and the engine tests
# import the kernels long before tests/kernels/ is collected: so decide here, once. Without a GPU the
# kernels run in the interpreter on the CPU; with one, the same tests run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.manual_seed(0)


@pytest.fixture(scope="session")
def minilm():
    from rewriter.models import load_model
    return load_model("minilm")


@pytest.fixture(scope="session")
def bert():
    """Tiny seeded BERT (4 layers, hidden 64): for engine promises that do not depend on model size."""
    from rewriter.models import load_model
    return load_model("bert")


@pytest.fixture(scope="session")
def llama():
    """Tiny seeded Llama (GQA 4/2 heads, RoPE, causal)."""
    from rewriter.models import load_model
    return load_model("llama")


@pytest.fixture(scope="session")
def vit():
    """Tiny seeded ViT (32x32 RGB, 4x4 patches: 65 tokens, fixed)."""
    from rewriter.models import load_model
    return load_model("vit")


@pytest.fixture(scope="session")
def smollm2():
    from rewriter.models import load_model
    return load_model("smollm2")


def _state_equal(a: torch.nn.Module, b: dict) -> bool:
    """Bit-for-bit equality of a module's state with a saved state dict (values and dtypes)."""
    sa = a.state_dict()
    return sa.keys() == b.keys() and all(
        sa[k].dtype == b[k].dtype and torch.equal(sa[k], b[k]) for k in sa)


@pytest.fixture
def state_equal():
    return _state_equal


@pytest.fixture
def frozen_state():
    def take(m):
        return {k: v.detach().clone() for k, v in m.state_dict().items()}
    return take
