"""``digits_vit``: a small ViT trained by the project on scikit-learn's handwritten digits.

A fixed-token subject for rules that need fixed token identities (``normlin``): an 8x8 grey
digit cut into 2x2 patches is always the same 16 patch positions plus the CLS token, so
token i means the same image region in every input. Dosovitskiy et al., "An Image is Worth
16x16 Words", arXiv:2010.11929 (the architecture: Hugging Face ``ViTForImageClassification``,
pre-norm, CLS token, learned position embeddings).

Data: ``sklearn.datasets.load_digits`` (1797 images, bundled with scikit-learn). The fixed
held-out rule of ``rewriter.models`` (every fifth image) splits it: the model trains on the
calibration part and its accuracy is measured on the held-out part, which neither training
nor calibration ever sees.

Training is deterministic (fixed seed, full-batch order from a seeded generator) and takes a
about 20 s on one CPU thread; the weights are cached in ``$REWRITER_CACHE/digits_vit`` (default
``~/.cache/rewriter/digits_vit``) with a marker holding the config, training settings and
held-out accuracy. A cache whose marker does not match the current settings is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .images import digit_indices, digits_pixel_values

log = logging.getLogger("rewriter.models")

__all__ = ["CONFIG", "TRAIN", "load_digits_vit", "digits_cache_dir", "digits_split", "accuracy"]

CONFIG = dict(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
              num_attention_heads=4, intermediate_size=128, num_labels=10,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# AdamW, one-cycle schedule; one CPU thread (deterministic whatever the machine's core count, and
# faster than 2 contended threads at this size: ~20 ms a step).
TRAIN = dict(epochs=25, batch_size=64, lr=3e-3, weight_decay=0.05, seed=0)
MEAN, STD = 0.5, 0.5
_MARKER = "rewriter-cache.json"


def digits_cache_dir() -> Path:
    """``$REWRITER_CACHE/digits_vit``, or ``~/.cache/rewriter/digits_vit``."""
    root = os.environ.get("REWRITER_CACHE") or Path.home() / ".cache" / "rewriter"
    return Path(root).expanduser() / "digits_vit"


def digits_split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train pixels, labels), (held-out pixels, labels)); pixels are (n, 1, 8, 8), normalized."""
    from sklearn.datasets import load_digits
    labels = torch.as_tensor(load_digits().target, dtype=torch.long)
    train_idx, held_idx = digit_indices()

    def part(idx):
        return digits_pixel_values(idx, CONFIG["image_size"], CONFIG["num_channels"], MEAN, STD), labels[idx]
    return part(train_idx), part(held_idx)


@torch.no_grad()
def accuracy(model, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model(pixel_values=...)`` (any output with ``.logits`` or a tensor)."""
    hits = 0
    for i in range(0, len(labels), batch_size):
        out = model(pixel_values=pixels[i:i + batch_size])
        logits = out.logits if hasattr(out, "logits") else out
        hits += (logits.argmax(-1) == labels[i:i + batch_size]).sum().item()
    return hits / len(labels)


def _fingerprint() -> str:
    return hashlib.sha256(json.dumps([CONFIG, TRAIN, MEAN, STD], sort_keys=True).encode()).hexdigest()[:16]


def _train():
    from transformers import ViTConfig
    (x, y), (xh, yh) = digits_split()
    cfg = ViTConfig(**CONFIG)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _fit(cfg, x, y)
    finally:
        torch.set_num_threads(threads)
    metrics = {"train_accuracy": accuracy(model, x, y), "heldout_accuracy": accuracy(model, xh, yh),
               "train_images": len(y), "heldout_images": len(yh),
               "train_seconds": round(time.perf_counter() - t0, 2)}
    return model, metrics


def _fit(cfg, x, y):
    from transformers import ViTForImageClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TRAIN["seed"])
        model = ViTForImageClassification(cfg)
        gen = torch.Generator().manual_seed(TRAIN["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
        steps = TRAIN["epochs"] * -(-len(y) // TRAIN["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=steps, pct_start=0.1)
        model.train()
        for _ in range(TRAIN["epochs"]):
            for idx in torch.randperm(len(y), generator=gen).split(TRAIN["batch_size"]):
                loss = F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()


def _cache_ok(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("fingerprint") == _fingerprint() else None


def load_digits_vit(attn_implementation: str = "sdpa", cache_dir: str | Path | None = None):
    """The trained digits ViT as a ``Loaded`` (kind "vision", 8x8x1 images, 17 tokens).

    Trains once (seconds) and caches; ``Loaded.extra`` holds the training metrics."""
    from transformers import ViTForImageClassification

    from .zoo import _REGISTRY, Loaded, _check_attn, _offline, atomic_dir
    _offline()
    attn = _check_attn(attn_implementation, "digits_vit")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else digits_cache_dir()
    meta = _cache_ok(cache)
    if meta is None:
        log.warning("digits_vit: training on scikit-learn digits once (about 20 s), cached in %s", cache)
        model, metrics = _train()

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            (tmp / _MARKER).write_text(json.dumps({"fingerprint": _fingerprint(), "config": CONFIG,
                                                   "train": TRAIN, "metrics": metrics}, indent=2))
        if cache.exists():                        # stale: move aside, then rebuild
            stale = cache.with_name(f".{cache.name}.stale-{os.getpid()}")
            os.rename(cache, stale)
            shutil.rmtree(stale, ignore_errors=True)
        atomic_dir(cache, write)
        meta = _cache_ok(cache)
        if meta is None:
            raise RuntimeError(f"digits_vit: the cache {cache} was written but its marker does not match")
    model = ViTForImageClassification.from_pretrained(cache, attn_implementation=attn, dtype=torch.float32,
                                                      local_files_only=True).float().eval()
    n_tokens = (CONFIG["image_size"] // CONFIG["patch_size"]) ** 2 + 1
    return Loaded("digits_vit", model, "vision", None, n_tokens, config=model.config,
                  image_size=CONFIG["image_size"], num_channels=CONFIG["num_channels"],
                  image_mean=MEAN, image_std=STD,
                  description=_REGISTRY["digits_vit"][0], extra={"cache_dir": str(cache), **meta["metrics"]})

