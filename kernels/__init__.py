"""Custom ops `rewriter::<op>`, one sub-package per op (reference, Triton kernel, registration).

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
