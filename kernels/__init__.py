"""Custom ops `rewriter::<op>` and the run-time attention code around them, one sub-package per op,
laid out like flash-linear-attention's per-variant op folders (DESIGN.md §4):

    reference.py    readable fp32 PyTorch, the ground truth
    cpu.py          the efficient PyTorch path (the CPU impl; what autograd recomputes)
    triton.py       Triton kernel(s) + host wrapper (the CUDA impl)
    onnx.py         the onnxscript translation(s)
    __init__.py     registration (custom op, fake impl, CPU/CUDA kernels, autograd, ONNX) and exports

`routed_attention/` holds no op of its own: it is the run-time routing (block tables, k-means
clusters) that a rewritten graph computes from the site's q/k before calling the
block-sparse op. `_onnx_common.py` holds the ONNX pieces the translations share.

Importing this package registers every op with torch.library and records its ONNX translation
in ONNX_TRANSLATIONS (op overload -> onnxscript function), which rewriter's ONNX export passes
to torch.onnx.export(custom_translation_table=...).
"""
import importlib
import pkgutil

# Run from the repository root, this folder shadows the PyPI package `kernels`, which transformers
# probes for (and imports when it finds no metadata). Imported under that name it registers nothing:
# registering the ops a second time would replace them with different op objects.
_SHADOW = __name__ != "rewriter.kernels"
if _SHADOW:
    __version__ = "0"

ONNX_TRANSLATIONS: dict = {}


def register_onnx(op_overload, translation) -> None:
    ONNX_TRANSLATIONS[op_overload] = translation


for _m in [] if _SHADOW else pkgutil.iter_modules(__path__):
    if _m.ispkg and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
