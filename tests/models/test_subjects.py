"""The project's own trained subjects: digits_vit (scikit-learn digits) and forecaster (iTransformer on
matplotlib's Stocks.csv). Registered, trained deterministically, cached, accurate, and traced with a
fixed token count."""
import json

import pytest
import torch

from rewriter import inspect
from rewriter.models import load_model, registered
from rewriter.models import forecaster as fc

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def test_registered():
    reg = registered()
    assert {"digits_vit", "forecaster"} <= set(reg)
    assert "digits" in reg["digits_vit"] and "Stocks.csv" in reg["forecaster"]


def test_stock_series_and_windows_split_in_time():
    x, dates = fc.stock_series()
    assert x.shape == (390, 7) and len(dates) == 390 and torch.isfinite(x).all()
    assert dates[0] == "1990-01-01" and dates == sorted(dates) and len(set(dates)) == 390
    cfg = fc.ForecasterConfig()
    (p_tr, f_tr), (p_te, f_te) = fc.windows("train"), fc.windows("test")
    assert p_tr.shape[1:] == (cfg.lookback, 7) and f_tr.shape[1:] == (cfg.horizon, 7)
    cut = int(fc.TRAIN_FRACTION * 390)
    assert len(p_tr) == cut - cfg.lookback - cfg.horizon + 1 and len(p_te) == 390 - cut - cfg.horizon + 1
    # the last training forecast ends where the first test forecast begins (no forecast month shared)
    z_last_train = f_tr[-1, -1]
    assert torch.equal(p_te[0, -1], z_last_train)
    assert torch.allclose(p_tr[:, :, 0].mean(), torch.tensor(0.0), atol=0.5)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        fc.windows("val")


def test_forecaster_calibration_is_train_and_heldout_is_test():
    cal = fc.forecaster_calibration(samples=32, batch_size=16, heldout=16)
    train, _ = fc.windows("train")
    test, _ = fc.windows("test")
    assert [b["past_values"].shape for b in cal.batches] == [(16, 24, 7)] * 2
    rows = torch.cat([b["past_values"] for b in cal.batches])
    assert all((train == r).all(-1).all(-1).any() for r in rows)
    assert torch.equal(torch.cat([b["past_values"] for b in cal.heldout]), test[:16])
    with pytest.raises(ValueError, match="at most 244 calibration"):
        fc.forecaster_calibration(samples=1000)


def test_forecaster_trains_deterministically_and_caches(tmp_path, monkeypatch):
    a = load_model("forecaster", cache_dir=tmp_path / "a")
    b = load_model("forecaster", cache_dir=tmp_path / "b")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    meta = json.loads((tmp_path / "a" / "rewriter-cache.json").read_text())
    assert meta["metrics"] == {k: a.extra[k] for k in ("train", "test", "train_seconds")}
    # it learned the training windows far better than the naive last-value forecast
    assert a.extra["train"]["mse"] < 0.8 * a.extra["train"]["naive_mse"]
    # a cache is reused, not retrained
    monkeypatch.setattr(fc, "_train", lambda cfg: pytest.fail("retrained although the cache is valid"))
    load_model("forecaster", cache_dir=tmp_path / "a")
    # a stale marker (other settings) forces a rebuild
    monkeypatch.undo()
    meta["fingerprint"] = "stale"
    (tmp_path / "a" / "rewriter-cache.json").write_text(json.dumps(meta))
    c = load_model("forecaster", cache_dir=tmp_path / "a")
    assert json.loads((tmp_path / "a" / "rewriter-cache.json").read_text())["fingerprint"] != "stale"
    assert all(torch.equal(c.model.state_dict()[k], sa[k]) for k in sa)


def test_forecaster_eager_and_sdpa_agree_and_trace_fixed_tokens(forecaster_pair):
    sdpa, eager = forecaster_pair
    past, _ = fc.windows("test")
    torch.testing.assert_close(eager.model(past_values=past), sdpa.model(past_values=past), atol=1e-5, rtol=1e-5)
    for loaded, canonicalized in ((sdpa, False), (eager, True)):
        sites = inspect(loaded, {"past_values": past[:4]})
        assert len(sites) == 2 and bool(sites.canonicalized) == canonicalized
        assert all(s.heads == 4 and s.head_dim == 16 and s.mask == "none" and s.norm == "post" for s in sites)
        assert all(s.q_proj and s.k_proj and s.v_proj and s.o_proj and s.residual_add for s in sites)


@pytest.fixture(scope="module")
def forecaster_pair():
    return load_model("forecaster"), load_model("forecaster", attn_implementation="eager")


def test_forecaster_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attn_implementation must be 'sdpa' or 'eager'"):
        fc.InvertedTransformer(attn_implementation="flash")


def test_digits_vit_accurate_cached_and_fixed_tokens():
    from rewriter.models.digits_vit import accuracy, digits_split
    loaded = load_model("digits_vit")
    assert loaded.kind == "vision" and loaded.image_size == 8 and loaded.num_channels == 1
    assert loaded.extra["heldout_accuracy"] >= 0.95 and loaded.extra["heldout_images"] == 359
    _, (x, y) = digits_split()
    assert accuracy(loaded.model, x, y) == pytest.approx(loaded.extra["heldout_accuracy"], abs=1e-9)
    sites = inspect(loaded, loaded.example_inputs(batch=3))
    assert len(sites) == 4 and all(s.heads == 4 and s.head_dim == 16 and s.norm == "pre" for s in sites)
    from rewriter.api import _prepare
    gm, *_ = _prepare(loaded, loaded.example_inputs(batch=3))
    shapes = [n.meta["val"].shape for n in gm.graph.nodes if n.target == SDPA]
    assert all(isinstance(s[-2], int) and s[-2] == 17 for s in shapes)
