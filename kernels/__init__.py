"""Custom ops `rewriter::<op>`, one sub-package per op (reference, Triton kernel, registration).

Importing this package registers every op with torch.library and records its ONNX translation
in ONNX_TRANSLATIONS (op overload -> onnxscript function), which rewriter's ONNX export passes
to torch.onnx.export(custom_translation_table=...).
"""
import importlib
import pkgutil

ONNX_TRANSLATIONS: dict = {}


def register_onnx(op_overload, translation) -> None:
    ONNX_TRANSLATIONS[op_overload] = translation


for _m in pkgutil.iter_modules(__path__):
    if _m.ispkg and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")
