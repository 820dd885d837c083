"""Calibration text: the bundled English corpus, Python's own docs, and user files.

Sources (the names a recipe's ``calibration.text`` accepts):

- ``"bundled"``: ``data/sentences.txt`` (one sentence per line, 5-40 words, mixed topics) and
  ``data/paragraphs.txt`` (paragraphs separated by blank lines), written for this project.
- ``"pydoc"``: the prose paragraphs of ``pydoc_data.topics`` (the standard library's help
  text, about 460k characters of English); headings and code blocks are left out.
- ``"python"``: Python source code, the top-level blocks (functions, classes, statements) of
  ``PYTHON_MODULES``, pure-Python modules of the running interpreter's standard library, verbatim.
- ``"legal"``: ``data/legal.txt``, the verbatim texts of eight software licenses (Apache 2.0,
  GPL 3, MPL 2.0, LGPL 2.1, GFDL 1.3, CC0 1.0, Artistic, the PSF license; each permits verbatim
  copies), split into paragraphs.
- ``"mix"``: all four kinds above, each kept apart (``load_sources``), so that calibration draws
  from every kind and the gate judges each kind on its own; ``"pydoc+python"`` names a mix of two.
- a ``.txt`` path: paragraphs separated by blank lines, or one sample per line when the file
  has no blank lines.
- a ``.jsonl`` path: one JSON object per line with a string ``"text"`` field.

Every source is a list of *units* (a sentence or a paragraph). The held-out split is fixed
and independent of any seed: unit ``i`` is held out when ``i % HELDOUT_EVERY ==
HELDOUT_EVERY - 1``, so held-out text is never used for calibration whatever the seed,
sample count or model kind. Units are de-duplicated first, and a held-out unit that shares a
run of ``OVERLAP_WORDS`` words with any calibration unit is dropped from the held-out part
(n-gram decontamination as in Brown et al., "Language Models are Few-Shot Learners",
arXiv:2005.14165, App. C, which used 13-grams; 8 words here because the pydoc topics repeat
whole sentences across related entries).
"""
from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from rewriter.calibrate import register_text

DATA_DIR = Path(__file__).resolve().parent / "data"
HELDOUT_EVERY = 5          # every fifth unit is held out (20 %)
OVERLAP_WORDS = 8          # a held-out unit sharing an 8-word run with calibration text is dropped
SENTENCES_PER_DOC = 8      # bundled sentences are grouped into running text for causal LMs
MIX = ("bundled", "pydoc", "python", "legal")   # the kinds of text of "mix", the causal-LM default
for _name in ("mix", *MIX):      # the names a recipe's calibration.text accepts (rewriter.calibrate)
    register_text(_name, MIX if _name == "mix" else ())
# pure-Python standard-library modules read by "python" (about 1 MB of source; a module this
# interpreter lacks or ships frozen is skipped)
PYTHON_MODULES = ("argparse", "ast", "calendar", "configparser", "contextlib", "csv", "dataclasses",
                  "difflib", "enum", "fractions", "functools", "gettext", "heapq", "inspect",
                  "ipaddress", "json.decoder", "json.encoder", "logging", "optparse", "pprint", "random",
                  "shlex", "shutil", "statistics", "string", "textwrap", "tokenize", "traceback")

__all__ = ["DATA_DIR", "HELDOUT_EVERY", "TextSource", "bundled_sentences", "bundled_paragraphs",
           "bundled_text", "pydoc_paragraphs", "python_blocks", "legal_paragraphs", "read_text_file",
           "split_heldout", "decontaminate", "load_source", "load_sources", "MIX"]


def split_heldout(items: list) -> tuple[list, list]:
    """(calibration, held-out): item ``i`` is held out when ``i % HELDOUT_EVERY == 4``.

    A list of 2-4 items, which that rule leaves without a held-out item, holds out its last
    one, so both parts are non-empty whenever there are at least two items."""
    calib = [x for i, x in enumerate(items) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [x for i, x in enumerate(items) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    if not held and len(items) >= 2:
        calib, held = list(items[:-1]), [items[-1]]
    return calib, held


@lru_cache(maxsize=None)
def _bundled_sentences() -> tuple[str, ...]:
    lines = (DATA_DIR / "sentences.txt").read_text(encoding="utf-8").splitlines()
    return tuple(s.strip() for s in lines if s.strip())


@lru_cache(maxsize=None)
def _bundled_paragraphs() -> tuple[str, ...]:
    return tuple(_blocks((DATA_DIR / "paragraphs.txt").read_text(encoding="utf-8")))


def bundled_sentences() -> list[str]:
    """The bundled sentences, one per line of ``data/sentences.txt``, in file order."""
    return list(_bundled_sentences())


def bundled_paragraphs() -> list[str]:
    """The bundled paragraphs of ``data/paragraphs.txt``, in file order, each on one line."""
    return list(_bundled_paragraphs())


def bundled_text() -> str:
    """All bundled text as one string: the paragraphs, then the sentences, blank-line separated."""
    return "\n\n".join(bundled_paragraphs() + bundled_sentences())


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks, each with its inner whitespace collapsed to single spaces."""
    return [" ".join(b.split()) for b in re.split(r"\n\s*\n", text) if b.strip()]


@lru_cache(maxsize=None)
def _pydoc_paragraphs() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.splitlines()
            if not lines or any(ln.startswith((" ", "\t")) for ln in lines):
                continue                                   # code sample or indented grammar
            if re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                continue                                   # a heading and its underline
            para = " ".join(block.split())
            words = para.split()
            letters = sum(c.isalpha() for c in para)
            if len(words) >= 8 and letters >= 0.6 * len(para) and para[-1] in ".:)\"'":
                out.append(para)
    return tuple(out)


def pydoc_paragraphs() -> list[str]:
    """Prose paragraphs of the stdlib ``pydoc_data.topics`` help text, in sorted-topic order."""
    return list(_pydoc_paragraphs())


@lru_cache(maxsize=None)
def _python_blocks() -> tuple[str, ...]:
    out = []
    for name in PYTHON_MODULES:
        spec = importlib.util.find_spec(name)
        origin = Path(spec.origin) if spec is not None and spec.origin else None
        if origin is None or origin.suffix != ".py" or not origin.is_file():
            continue
        for block in re.split(r"\n\s*\n(?=[^\s)\]}])", origin.read_text(encoding="utf-8")):
            if block.count("\n") >= 1 and len(re.findall(r"\w+", block)) >= 8:
                out.append(block.strip("\n"))
    return tuple(out)


def python_blocks() -> list[str]:
    """Top-level blocks of the ``PYTHON_MODULES`` sources, verbatim (indentation and newlines kept):
    the source cut at every blank line followed by an unindented line; one-line blocks dropped."""
    return list(_python_blocks())


@lru_cache(maxsize=None)
def _legal_paragraphs() -> tuple[str, ...]:
    blocks = _blocks((DATA_DIR / "legal.txt").read_text(encoding="utf-8"))
    return tuple(b for b in blocks if len(b.split()) >= 6)


def legal_paragraphs() -> list[str]:
    """Paragraphs (six words or more) of the license texts in ``data/legal.txt``, in file order."""
    return list(_legal_paragraphs())


def read_text_file(path: str | Path) -> list[str]:
    """Units of a user text file: ``.jsonl`` objects' ``"text"`` fields, or ``.txt`` paragraphs.

    A ``.txt`` file is split at blank lines when it has any, otherwise one unit per line.
    Raises FileNotFoundError naming a missing file and ValueError naming the file and line
    of a bad JSONL record."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration text file not found: {path}")
    raw = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        units = []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise ValueError(f'{path}:{lineno}: expected a JSON object with a "text" field, '
                                 f"got {type(obj).__name__}"
                                 + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else ""))
            if not isinstance(obj["text"], str):
                raise ValueError(f'{path}:{lineno}: "text" must be a string, '
                                 f"got {type(obj['text']).__name__}")
            if obj["text"].strip():
                units.append(" ".join(obj["text"].split()))
    elif path.suffix.lower() == ".txt":
        units = _blocks(raw) if re.search(r"\n\s*\n", raw.strip()) else \
            [ln.strip() for ln in raw.splitlines() if ln.strip()]
    else:
        raise ValueError(f"calibration text file {path}: expected a .txt or .jsonl file, "
                         f"got suffix {path.suffix!r}")
    if not units:
        raise ValueError(f"calibration text file {path} holds no text")
    return units


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def decontaminate(calibration: list[str], heldout: list[str],
                  n: int = OVERLAP_WORDS) -> list[str]:
    """``heldout`` without the units that share a run of ``n`` words with ``calibration``."""
    seen = set().union(*(_word_ngrams(t, n) for t in calibration)) if calibration else set()
    return [t for t in heldout if seen.isdisjoint(_word_ngrams(t, n))]


def _split(units: list[str]) -> tuple[list[str], list[str]]:
    cal, held = split_heldout(list(dict.fromkeys(units)))     # exact duplicates removed first
    return cal, decontaminate(cal, held)


@dataclass
class TextSource:
    """One calibration text source, already split into calibration and held-out parts.

    ``samples`` are the units an encoder embeds one at a time (sentences and paragraphs);
    ``documents`` are the units a causal LM reads as running text (paragraphs, or groups of
    ``SENTENCES_PER_DOC`` sentences). Each pair of lists is disjoint by construction."""
    name: str
    samples: list[str]
    heldout_samples: list[str]
    documents: list[str]
    heldout_documents: list[str]


def _group(sentences: list[str], n: int) -> list[str]:
    return [" ".join(sentences[i:i + n]) for i in range(0, len(sentences), n)]


def load_source(text: str | list[str] = "bundled") -> TextSource:
    """Resolve a calibration source name or path, or a list of strings (one unit each, split like a
    file's), to a split TextSource (see module doc)."""
    if isinstance(text, (list, tuple)):
        bad = next((i for i, t in enumerate(text) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"calibration text: item {bad} is {type(text[bad]).__name__}, not a string")
        return _units_source(f"{len(text)} strings", [" ".join(t.split()) for t in text if t.strip()])
    if text == "bundled":
        s_cal, s_held = _split(bundled_sentences())
        p_cal, p_held = _split(bundled_paragraphs())
        s_held = decontaminate(p_cal, s_held)
        p_held = decontaminate(s_cal, p_held)
        return TextSource("bundled", s_cal + p_cal, s_held + p_held,
                          p_cal + _group(s_cal, SENTENCES_PER_DOC),
                          p_held + _group(s_held, SENTENCES_PER_DOC))
    named = {"pydoc": pydoc_paragraphs, "python": python_blocks, "legal": legal_paragraphs}
    if text in named:
        cal, held = _split(named[text]())
        return TextSource(text, cal, held, cal, held)
    path = Path(text).expanduser()
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ValueError(f"unknown calibration text {text!r}: use one of {', '.join(MIX)}, 'mix' (all "
                         f"four), a '+'-joined mix such as 'pydoc+python', a .txt path or a .jsonl path")
    return _units_source(str(path), read_text_file(path), f"calibration text file {path}")


def load_sources(text: str | list[str] = "mix") -> list[TextSource]:
    """The kinds of text a calibration source name stands for, each split on its own: "mix" is the
    four of ``MIX``, "pydoc+python" two of them; any other name, path or list is one
    (``load_source``)."""
    if isinstance(text, str):
        parts = list(MIX) if text == "mix" else text.split("+")
        if len(parts) > 1 and all(p in MIX for p in parts):
            if len(set(parts)) < len(parts):
                raise ValueError(f"calibration text {text!r} names a kind twice")
            return [load_source(p) for p in parts]
    return [load_source(text)]


def _units_source(name: str, units: list[str], what: str | None = None) -> TextSource:
    what = what or f"calibration text ({name})"
    if len(units) < 2:
        raise ValueError(f"{what} holds {len(units)} sample{'s' if len(units) != 1 else ''}; at least 2 "
                         f"are needed so that held-out text stays disjoint from calibration text")
    cal, held = _split(units)
    if not held:
        raise ValueError(f"{what}: every held-out sample repeats calibration text, so no disjoint "
                         f"held-out set exists")
    return TextSource(name, cal, held, cal, held)
