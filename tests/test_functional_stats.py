"""FunctionalStats: streaming sums, Lipschitz slopes, exact merge, round trip."""

import numpy as np
import pytest
import torch

from skipit.errors import SkipitError
from skipit.functional_stats import FunctionalStats, slope_quantile
from skipit.stats import StatsConfig

CONFIG = StatsConfig(n_bootstrap=50)


def fill(stats: FunctionalStats, start: int, n: int, gen: torch.Generator) -> dict:
    """n examples: random logit-lens values, and ablations of layer 1 / vision; returns what was fed."""
    ids = [f"e{i}" for i in range(start, start + n)]
    kl, tv = torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
    stats.update_lens(ids, kl, tv)
    a_kl, a_tv = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    norm = torch.rand(n, generator=gen) * 10
    present = torch.rand(n, generator=gen) > 0.3
    stats.update_ablation(ids, 1, "vision", a_kl, a_tv, norm, present)
    return {"kl": kl, "tv": tv, "a_kl": a_kl[present], "a_tv": a_tv[present], "norm": norm[present]}


def test_means_slopes_and_bound_match_direct_computation():
    stats, gen = FunctionalStats(3, config=CONFIG, ablation=True), torch.Generator().manual_seed(0)
    parts = [fill(stats, 0, 7, gen), fill(stats, 7, 9, gen)]
    fed = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = stats.finalize()
    np.testing.assert_allclose(out["logit_lens"]["kl"]["mean"], fed["kl"].double().mean(0).numpy(), rtol=1e-12)
    vision = out["ablation"]["vision"]
    assert vision["n_examples"] == [0, len(fed["a_kl"]), 0]
    assert vision["kl"]["mean"][1] == pytest.approx(float(fed["a_kl"].double().mean()), rel=1e-12)
    slopes = (fed["a_tv"].double() / fed["norm"].double()).numpy()
    k_max = vision["lipschitz"]["max"]
    assert k_max["lipschitz"][1] == pytest.approx(slopes.max(), rel=1e-12)
    assert k_max["bound"][1] == pytest.approx(slopes.max() * float(fed["norm"].double().mean()), rel=1e-12)
    assert k_max["holds"][1] is True and k_max["holds"][0] is None
    k90 = vision["lipschitz"]["q0.9"]["lipschitz"][1]
    q90 = np.quantile(slopes, 0.9, method="inverted_cdf")
    assert q90 <= k90 <= q90 * 1.024  # the bin's upper edge: within 0.01 decade above
    lo, hi = vision["kl"]["ci_low"][1], vision["kl"]["ci_high"][1]
    assert lo < vision["kl"]["mean"][1] < hi


def test_merge_equals_one_pass_and_round_trips():
    one, a, b = (FunctionalStats(3, config=CONFIG, ablation=True) for _ in range(3))
    fill(one, 0, 5, torch.Generator().manual_seed(1))
    fill(one, 5, 6, torch.Generator().manual_seed(2))
    fill(a, 0, 5, torch.Generator().manual_seed(1))
    fill(b, 5, 6, torch.Generator().manual_seed(2))
    merged = FunctionalStats.from_state_dict(b.state_dict()).merge(a)
    for k in FunctionalStats._TENSORS:
        torch.testing.assert_close(getattr(merged, k), getattr(one, k), rtol=1e-12, atol=1e-12)
    assert merged.finalize()["ablation"]["vision"]["lipschitz"] == one.finalize()["ablation"]["vision"]["lipschitz"]
    with pytest.raises(SkipitError, match="different setups"):
        one.merge(FunctionalStats(3, config=CONFIG, ablation=False))


def test_slope_quantile_of_a_histogram():
    hist = np.zeros(1600)
    hist[[1000, 1100]] = [9, 1]  # slopes around 10^-2 and 10^-1
    assert slope_quantile(hist, 0.5) == pytest.approx(10 ** (-12 + 1001 * 0.01))
    assert slope_quantile(hist, 0.95) == pytest.approx(10 ** (-12 + 1101 * 0.01))
    assert np.isnan(slope_quantile(np.zeros(1600), 0.5))
