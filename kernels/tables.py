"""Per-op tables that op folders declare next to their ops (`flops.py`'s FLOPS, `decode.py`'s DECODE
and NO_DECODE), collected by name from every op folder of this package, each once."""
from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.cache
def collect(module: str, table: str) -> dict:
    """{name: entry} merged from `<op folder>.<module>.<table>` of every op folder that has one;
    a name declared by two folders raises."""
    found: dict = {}
    pkg = importlib.import_module(__name__.rpartition(".")[0])
    for m in pkgutil.iter_modules(pkg.__path__):
        if not m.ispkg or m.name.startswith("_"):
            continue
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{m.name}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{pkg.__name__}.{m.name}.{module}":
                raise
            continue
        for name, entry in getattr(mod, table, {}).items():
            if name in found:
                raise ValueError(f"{mod.__file__}: {table} entry {name!r} defined twice")
            found[name] = entry
    return found
