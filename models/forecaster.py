"""``forecaster``: a small inverted transformer (variates as tokens) trained on a real series.

Architecture: iTransformer, Liu et al., "iTransformer: Inverted Transformers Are Effective for
Time Series Forecasting", ICLR 2024, arXiv:2310.06625. Each variate's whole lookback window is
embedded as one token, attention mixes the N variates, and a linear head maps each token to its
forecast. Inputs are normalized per window and variate and the forecast de-normalized (RevIN,
Kim et al., ICLR 2022), so level shifts do not reach the attention. Post-norm encoder layers, as
in iTransformer and OLinear (arXiv:2505.08550):

    past (B, L, N) ─ RevIN ─ transpose ─ Linear(L→D) ─ [x = LN(x + Attn(x)); x = LN(x + FFN(x))]×E
                   ─ Linear(D→S) ─ transpose ─ de-RevIN → forecast (B, S, N)

The token count N and the token identities (token i is always variate i) are fixed: the
subject for ``normlin``.

Data: ``Stocks.csv`` shipped with matplotlib (``matplotlib.cbook.get_sample_data``; monthly
closing prices from Yahoo Finance, 1990-01 to 2022-06). The 7 series with no gaps are used
(IBM, AAPL, MSFT, XRX, ADBE, S&P 500, NASDAQ Composite) as log prices, standardized with the
training part's mean and std. Split in time: the first 70% of months train; windows whose
forecast falls in the last 30% are the test set (their lookback may reach back into the
training months, as usual in forecasting benchmarks). Lookback 24 months, horizon 6.

Training is deterministic (fixed seed, one CPU thread) and takes seconds; the weights are cached
in ``$REWRITER_CACHE/forecaster`` (default ``~/.cache/rewriter/forecaster``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter.calibrate import Calibration

log = logging.getLogger("rewriter.models")

__all__ = ["ForecasterConfig", "InvertedTransformer", "load_forecaster", "stock_series", "windows",
           "forecast_error", "forecaster_calibration", "forecaster_cache_dir", "VARIATES"]

VARIATES = ("IBM", "AAPL", "MSFT", "XRX", "ADBE", "^GSPC", "^IXIC")
TRAIN_FRACTION = 0.7
# AdamW, 20 epochs over 244 windows in batches of 32 (about 2 s on one CPU thread); longer training
# only overfits: monthly log prices are close to a random walk.
TRAIN = dict(epochs=20, batch_size=32, lr=1e-3, weight_decay=1e-4, seed=0)
_MARKER = "rewriter-cache.json"


@dataclass(frozen=True)
class ForecasterConfig:
    variates: int = len(VARIATES)
    lookback: int = 24
    horizon: int = 6
    dim: int = 64
    heads: int = 4
    layers: int = 2
    ffn: int = 128
    eps: float = 1e-5


class Block(nn.Module):
    """Post-norm encoder layer: x = LN(x + W_o·attn(W_q x, W_k x, W_v x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: ForecasterConfig, attn_implementation: str):
        super().__init__()
        self.heads, self.attn_implementation = cfg.heads, attn_implementation
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn), nn.GELU(), nn.Linear(cfg.ffn, cfg.dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        hd = D // self.heads
        q, k, v = (p(x).view(B, N, self.heads, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.attn_implementation == "sdpa":                                    # (B, H, N, hd)
            y = F.scaled_dot_product_attention(q, k, v)
        else:                                                                     # written out
            y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, N, D))                   # (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.ffn(x))


class InvertedTransformer(nn.Module):
    """iTransformer forecaster: ``forward(past_values (B, L, N)) -> forecast (B, S, N)``."""

    def __init__(self, cfg: ForecasterConfig = ForecasterConfig(), attn_implementation: str = "sdpa"):
        super().__init__()
        if attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"InvertedTransformer: attn_implementation must be 'sdpa' or 'eager', "
                             f"got {attn_implementation!r}")
        self.cfg = cfg
        self.embed = nn.Linear(cfg.lookback, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, attn_implementation) for _ in range(cfg.layers))
        self.head = nn.Linear(cfg.dim, cfg.horizon)

    def forward(self, past_values: torch.Tensor) -> torch.Tensor:
        mean = past_values.mean(1, keepdim=True)                                   # (B, 1, N)
        std = (past_values.var(1, keepdim=True, unbiased=False) + self.cfg.eps).sqrt()
        x = self.embed(((past_values - mean) / std).transpose(1, 2))               # (B, N, D)
        for block in self.blocks:
            x = block(x)
        return self.head(x).transpose(1, 2) * std + mean                          # (B, S, N)


# ---- data ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def stock_series() -> tuple[torch.Tensor, list[str]]:
    """(log closing prices (T, 7) float64, dates) from matplotlib's bundled Stocks.csv."""
    try:
        from matplotlib import cbook
    except ImportError as e:
        raise ImportError("model 'forecaster' reads Stocks.csv shipped with matplotlib "
                          "(pip install matplotlib)") from e
    path = cbook.get_sample_data("Stocks.csv", asfileobj=False)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].startswith("#")]
    header, body = rows[0], rows[1:]
    cols = [header.index(v) for v in VARIATES]
    dates, values = [], []
    for r in body:
        if any(not r[c] for c in cols):
            continue                                    # blank separator rows
        v = [float(r[c]) for c in cols]
        if values and v == values[-1]:
            continue                                    # the file repeats its last month
        dates.append(r[0])
        values.append(v)
    x = torch.tensor(values, dtype=torch.float64).log()
    if x.shape[0] < 300 or not torch.isfinite(x).all():
        raise RuntimeError(f"forecaster: unexpected contents of {path}: {tuple(x.shape)} values")
    return x, dates


def windows(split: str, cfg: ForecasterConfig = ForecasterConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(past (n, L, N), future (n, S, N)) float32 windows of the standardized series.
    split "train": forecasts inside the first 70% of months; "test": forecasts inside the rest."""
    x, _ = stock_series()
    cut = int(TRAIN_FRACTION * x.shape[0])
    mu, sd = x[:cut].mean(0), x[:cut].std(0)
    z = ((x - mu) / sd).float()
    L, S = cfg.lookback, cfg.horizon
    if split == "train":
        starts = range(0, cut - L - S + 1)
    elif split == "test":
        starts = range(cut - L, z.shape[0] - L - S + 1)
    else:
        raise ValueError(f"windows: split must be 'train' or 'test', got {split!r}")
    past = torch.stack([z[s:s + L] for s in starts])
    future = torch.stack([z[s + L:s + L + S] for s in starts])
    return past, future


@torch.no_grad()
def forecast_error(model, split: str = "test", cfg: ForecasterConfig = ForecasterConfig()) -> dict:
    """MSE and MAE (standardized units) of ``model(past_values=...)`` on a split, with the naive
    last-value forecast's errors beside them for scale."""
    past, future = windows(split, cfg)
    pred = model(past_values=past)
    pred = pred if isinstance(pred, torch.Tensor) else pred[0]
    naive = past[:, -1:, :].expand_as(future)
    return {"mse": F.mse_loss(pred, future).item(), "mae": F.l1_loss(pred, future).item(),
            "naive_mse": F.mse_loss(naive, future).item(), "naive_mae": F.l1_loss(naive, future).item(),
            "windows": len(past)}


def forecaster_calibration(samples: int = 64, batch_size: int = 16, heldout: int = 64, seed: int = 0):
    """A ``rewriter.calibrate.Calibration``: training windows (seeded draw) as calibration batches,
    test windows (first ``heldout`` in time order) as the held-out batches, never overlapping in
    forecast months."""
    cfg = ForecasterConfig()
    train, _ = windows("train", cfg)
    test, _ = windows("test", cfg)
    if samples > len(train) or heldout > len(test):
        raise ValueError(f"forecaster_calibration: at most {len(train)} calibration and {len(test)} "
                         f"held-out windows exist; asked for {samples} and {heldout}")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:samples]
    return Calibration([{"past_values": b} for b in train[pick].split(batch_size)],
                       [{"past_values": b} for b in test[:heldout].split(batch_size)],
                       "Stocks.csv", samples, cfg.variates, heldout, "generic")


def _inputs_fn(batch: int, seq_len: int, seed: int) -> dict:
    """``batch`` training windows drawn with ``seed`` (``seq_len`` is ignored: the lookback is fixed)."""
    train, _ = windows("train")
    idx = torch.randint(len(train), (batch,), generator=torch.Generator().manual_seed(seed))
    return {"past_values": train[idx]}


# ---- training and cache --------------------------------------------------------------------------

def forecaster_cache_dir() -> Path:
    """``$REWRITER_CACHE/forecaster``, or ``~/.cache/rewriter/forecaster``."""
    root = os.environ.get("REWRITER_CACHE") or Path.home() / ".cache" / "rewriter"
    return Path(root).expanduser() / "forecaster"


def _fingerprint(cfg: ForecasterConfig) -> str:
    blob = json.dumps([asdict(cfg), TRAIN, VARIATES, TRAIN_FRACTION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _train(cfg: ForecasterConfig) -> tuple[InvertedTransformer, dict]:
    past, future = windows("train", cfg)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # deterministic whatever the core count; fast at this size
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TRAIN["seed"])
            model = InvertedTransformer(cfg)
            gen = torch.Generator().manual_seed(TRAIN["seed"])
            opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
            model.train()
            for _ in range(TRAIN["epochs"]):
                for idx in torch.randperm(len(past), generator=gen).split(TRAIN["batch_size"]):
                    loss = F.mse_loss(model(past_values=past[idx]), future[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    metrics = {"train": forecast_error(model, "train", cfg), "test": forecast_error(model, "test", cfg),
               "train_seconds": round(time.perf_counter() - t0, 2)}
    return model, metrics


def _cache_meta(folder: Path, cfg: ForecasterConfig) -> dict | None:
    try:
        meta = json.loads((folder / _MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = meta.get("fingerprint") == _fingerprint(cfg) and (folder / "model.safetensors").is_file()
    return meta if ok else None


def load_forecaster(attn_implementation: str = "sdpa", cache_dir: str | Path | None = None):
    """The trained forecaster as a ``Loaded`` (kind "generic"; inputs ``{"past_values": (B, 24, 7)}``).

    Trains once (seconds) and caches; ``Loaded.extra`` holds train/test forecast errors."""
    from safetensors.torch import load_file, save_file

    from .zoo import _REGISTRY, Loaded, atomic_dir
    cfg = ForecasterConfig()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else forecaster_cache_dir()
    meta = _cache_meta(cache, cfg)
    if meta is None:
        log.warning("forecaster: training on matplotlib's Stocks.csv once (seconds), cached in %s", cache)
        trained, metrics = _train(cfg)

        def write(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / _MARKER).write_text(json.dumps({"fingerprint": _fingerprint(cfg), "config": asdict(cfg),
                                                   "train": TRAIN, "metrics": metrics}, indent=2))
        if cache.exists():
            stale = cache.with_name(f".{cache.name}.stale-{os.getpid()}")
            os.rename(cache, stale)
            shutil.rmtree(stale, ignore_errors=True)
        atomic_dir(cache, write)
        meta = _cache_meta(cache, cfg)
        if meta is None:
            raise RuntimeError(f"forecaster: the cache {cache} was written but its marker does not match")
    model = InvertedTransformer(cfg, attn_implementation)
    model.load_state_dict(load_file(str(cache / "model.safetensors")))
    return Loaded("forecaster", model.float().eval(), "generic", None, cfg.lookback,
                  inputs_fn=_inputs_fn, description=_REGISTRY["forecaster"][0],
                  extra={"cache_dir": str(cache), **meta["metrics"]})

