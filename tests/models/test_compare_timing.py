"""`kvexport compare` times the baseline and every codec alike (issue 10, item 6d)."""

from __future__ import annotations

from kvexport.models import cache as cache_mod
from kvexport.models import compare
from kvexport.models.loading import load_model


def test_timed_region_holds_no_cosine_reference(monkeypatch):
    """The fidelity pass computes exact attention beside the codec's (the cosine reference); the
    s/window of a row must not contain it, or codecs look slower than the baseline by that much.
    Checked structurally (which calls run inside the timed region), not by wall time, which a
    loaded CI machine makes noisy."""
    ref, timed = cache_mod.reference_attention, compare._timed
    inside, during, regions = [], [], []

    def spy_timed(fn, device):
        inside.append(1)
        try:
            regions.append(timed(fn, device))
            return regions[-1]
        finally:
            inside.pop()

    def spy_reference(*a, **k):
        during.append(bool(inside))
        return ref(*a, **k)

    monkeypatch.setattr(compare, "_timed", spy_timed)
    monkeypatch.setattr(cache_mod, "reference_attention", spy_reference)
    lm = load_model("tiny:llama")
    cfg = compare.CompareConfig(specs=["kivi:bits=4", "turbo:bits=4"], windows=1, window_len=32)
    rep = compare.run_compare(lm, "The quick brown fox jumps over the lazy dog. " * 20, "fox", cfg, progress=False)
    assert during, "the fidelity pass ran no cosine reference: the test measures nothing"
    assert not any(during), "a cosine reference ran inside the timed region"
    assert len(regions) == 1 + len(cfg.specs)  # the baseline and each codec: one timed window each
    head, body = compare._table(rep)
    col = head.index("s/window")
    got = [float(r[col]) for r in body]
    want = [rep["baseline"]["seconds_per_window"]] + [r["seconds_per_window"] for r in rep["codecs"]]
    assert got == [round(x, 2) for x in want] and sorted(want) == sorted(regions)
