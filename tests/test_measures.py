"""Known answers for the pure measures on synthetic tensors."""

import math

import numpy as np
import pytest
import torch

from skipit.measures import (
    angular_distance,
    block_influence,
    bootstrap_mean,
    cka_from_grams,
    conditional_entropy,
    cosine,
    decision_stability,
    distances,
    gaussian_conditional_entropy,
    hidden_distance,
    hidden_distance_from_rho,
    histogram,
    informational_by_layer,
    kl_from_logits,
    linear_cka,
    lipschitz_bound,
    lipschitz_estimate,
    normalised_cosine_distance,
    pca_scores,
    plugin_entropy,
    quantize,
    select_redundant,
    spearman,
    tail_probability,
    tv_from_logits,
    var_from_sums,
    vision_attention_terms,
)
from skipit.measures.proximal import bin_index


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- geometric


def test_cosine_distances_known_angles():
    a = torch.randn(5, 32, generator=gen())
    orth = torch.randn(5, 32, generator=gen(1))
    orth = orth - (orth * a).sum(-1, keepdim=True) / (a * a).sum(-1, keepdim=True) * a  # Gram-Schmidt
    for b, rho, ang, bi in [(a, 0.0, 0.0, 0.0), (orth, 0.5, 0.5, 1.0), (-a, 1.0, 1.0, 2.0), (3 * a, 0.0, 0.0, 0.0)]:
        assert torch.allclose(normalised_cosine_distance(a, b), torch.full((5,), rho, dtype=torch.float64), atol=1e-7)
        assert torch.allclose(angular_distance(a, b), torch.full((5,), ang, dtype=torch.float64), atol=1e-7)
        assert torch.allclose(block_influence(a, b), torch.full((5,), bi, dtype=torch.float64), atol=1e-7)
    assert normalised_cosine_distance(a, a).abs().max() < 1e-12  # float64 inside, even for float32 input
    assert angular_distance(a, 2 * a).abs().max() < 1e-12  # no arccos(1 - eps) blow-up near 0


def test_cosine_at_60_degrees_and_zero_vectors():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, math.sqrt(3) / 2]])
    assert normalised_cosine_distance(a, b).item() == pytest.approx(0.25)
    assert angular_distance(a, b).item() == pytest.approx(1 / 3)
    z = torch.zeros(1, 2)
    assert cosine(z, z).item() == 1.0 and cosine(z, a).item() == 0.0


def test_distances_chunking_and_agreement_with_cosine():
    a, b = torch.randn(3, 7, 16, generator=gen()), torch.randn(3, 7, 16, generator=gen(1))
    rho, ang = distances(a, b)
    assert all(torch.equal(x, y) for x, y in zip(distances(a, b, chunk=4), (rho, ang), strict=True))
    assert rho.shape == (3, 7)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert torch.allclose(rho, (1 - cos) / 2, atol=1e-12)
    assert torch.allclose(ang, torch.arccos(cos) / math.pi, atol=1e-12)


def test_bootstrap_mean_by_hand():
    # replicate columns: plain, then two bootstrap replicates
    sums = np.array([[6.0, 4.0, 10.0], [0.0, 0.0, 0.0]])
    counts = np.array([[3.0, 1.0, 4.0], [0.0, 0.0, 0.0]])
    out = bootstrap_mean(sums, counts, level=0.5)
    assert out["mean"][0] == 2.0
    assert out["ci_low"][0] == pytest.approx(np.quantile([4.0, 2.5], 0.25))
    assert out["ci_high"][0] == pytest.approx(np.quantile([4.0, 2.5], 0.75))
    assert np.isnan(out["mean"][1]) and np.isnan(out["ci_low"][1])


# ---------------------------------------------------------------- proximal


def test_bin_convention_right_closed():
    n = 10
    rho = torch.tensor([0.0, 0.1, 0.1000001, 0.95, 1.0], dtype=torch.float64)
    assert bin_index(rho, n).tolist() == [0, 0, 1, 9, 9]


def test_tail_matches_empirical_fraction_on_edges_and_interpolates_inside():
    rho = torch.rand(5000, generator=gen(), dtype=torch.float64) ** 3
    n = 200
    hist = histogram(rho, n).numpy()
    for j in (0, 1, 7, 50, 199, 200):
        delta = j / n
        assert tail_probability(hist, delta) == pytest.approx((rho > delta).double().mean().item(), abs=1e-12)
    delta = 0.0123  # inside a bin: off by at most that bin's mass
    j = int(delta * n)
    bin_mass = hist[j] / hist.sum()
    assert abs(tail_probability(hist, delta) - (rho > delta).double().mean().item()) <= bin_mass
    assert tail_probability(hist, -0.1) == 1.0 and tail_probability(hist, 1.0) == 0.0
    assert np.isnan(tail_probability(np.zeros(n), 0.1))


def test_tail_broadcasts_over_layers():
    hist = np.array([[1, 0, 0, 1], [0, 0, 2, 2]])
    assert tail_probability(hist, 0.25).tolist() == [0.5, 1.0]
    assert tail_probability(hist, 0.75).tolist() == [0.5, 0.5]


# ---------------------------------------------------------------- informational


def test_plugin_entropy_known_counts():
    h_ml = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert plugin_entropy([1, 1, 2, 0], miller_madow=False) == pytest.approx(h_ml)
    assert plugin_entropy([1, 1, 2, 0]) == pytest.approx(h_ml + (3 - 1) / (2 * 4))
    assert plugin_entropy([5]) == 0.0
    assert np.isnan(plugin_entropy([0, 0]))


def test_plugin_entropy_discrete_uniform_sample():
    counts = np.bincount(torch.randint(0, 8, (20000,), generator=gen()).numpy())
    assert plugin_entropy(counts) == pytest.approx(math.log(8), abs=5e-3)
    # small samples: the plug-in is biased low, Miller-Madow removes most of it (averaged over 2000 samples)
    small = np.random.default_rng(0).integers(0, 8, (2000, 20))
    counts = np.stack([np.bincount(row, minlength=8) for row in small])
    bias_ml = plugin_entropy(counts, miller_madow=False).mean() - math.log(8)
    bias_mm = plugin_entropy(counts).mean() - math.log(8)
    assert bias_ml < -0.1 and abs(bias_mm) < abs(bias_ml) / 3


def test_conditional_entropy_known_cases():
    g = np.random.default_rng(0)
    x = g.integers(0, 4, 40000)
    h_cond, h_y = conditional_entropy(x, x)
    assert h_cond == pytest.approx(0.0, abs=1e-12) and h_y == pytest.approx(math.log(4), abs=1e-3)
    flip = g.random(len(x)) < 0.25
    y = (x + flip) % 4  # H(Y|X) = binary entropy of 0.25
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert conditional_entropy(y, x)[0] == pytest.approx(h2, abs=0.01)
    indep = g.integers(0, 4, len(x))
    assert conditional_entropy(indep, x)[0] == pytest.approx(math.log(4), abs=0.01)


def test_conditional_entropy_with_weights():
    x = np.array([0, 0, 1, 1])
    y = np.array([0, 1, 0, 0])
    h, _ = conditional_entropy(y, x, np.ones(4), miller_madow=False)
    assert h == pytest.approx(0.5 * math.log(2))
    # doubling a row equals repeating it
    w = np.array([[2.0, 1.0, 1.0, 1.0]])
    rep = conditional_entropy(np.array([0, 0, 1, 0, 0]), np.array([0, 0, 0, 1, 1]), miller_madow=False)[0]
    assert conditional_entropy(y, x, w, miller_madow=False)[0][0] == pytest.approx(rep)


def test_gaussian_conditional_entropy_known():
    g = np.random.default_rng(0)
    x = g.standard_normal((40000, 3))
    sigma = np.array([0.5, 1.0, 2.0])
    y = x @ g.standard_normal((3, 3)) + g.standard_normal((40000, 3)) * np.sqrt(sigma)
    expected = 0.5 * math.log(np.prod(2 * math.pi * math.e * sigma))
    assert gaussian_conditional_entropy(y, x) == pytest.approx(expected, abs=0.03)


def test_pca_scores_recover_the_dominant_direction():
    g = np.random.default_rng(0)
    u = np.zeros(40)
    u[3] = 1.0
    x = np.outer(g.standard_normal(300) * 10, u) + 0.01 * g.standard_normal((300, 40))
    for rows in (300, 20, 8):  # randomized (N > D, N < D) and exact (k + oversample >= N)
        z = pca_scores(torch.from_numpy(x[:rows]), 2)
        assert abs(np.corrcoef(z[:, 0], x[:rows, 3])[0, 1]) > 0.999
        assert z[:, 0].var() > 100 * z[:, 1].var()


def test_randomized_pca_matches_exact_svd():
    g = np.random.default_rng(0)
    x = g.standard_normal((200, 60)) * 0.7 ** np.arange(60)  # a decaying spectrum, as in hidden states
    xc = x - x.mean(0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    z = pca_scores(torch.from_numpy(x), 4)
    assert np.allclose(np.abs(z), np.abs(u[:, :4] * s[:4]), atol=1e-6)  # equal up to each direction's sign


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_quantize_separates_clusters(method):
    g = np.random.default_rng(0)
    centres = np.array([[-10.0, -10.0], [10.0, 10.0], [-10.0, 10.0], [10.0, -10.0]])
    labels = g.integers(0, 4, 400)
    z = centres[labels] + g.standard_normal((400, 2))
    codes = quantize(z, 4, method)
    assert len(set(codes)) == 4
    assert all(len(set(codes[labels == c])) == 1 for c in range(4))  # each cluster gets one code


def test_informational_by_layer_copy_and_independent_layers():
    g = np.random.default_rng(0)
    x0 = g.standard_normal((400, 4))
    scores = [x0, x0.copy(), g.standard_normal((400, 4))]  # layer 1 copies X_0, layer 2 forgets it
    w = np.random.default_rng(1).poisson(1.0, (30, 400)).astype(float)
    out = informational_by_layer(scores, w, n_codes=4, n_components=2, grid_codes=(2, 4), grid_components=(1, 2))
    assert out["h_cond"][0] == pytest.approx(0.0, abs=1e-12) and out["score"][0] == 0.0
    assert out["score"][1] > 0.9
    assert out["ci_low"][1] <= out["score"][1] <= out["ci_high"][1] + 1e-12
    assert out["sensitivity"]["score"].shape == (2, 2, 2)
    assert out["gaussian_h_cond"][0] < out["gaussian_h_cond"][1] - 5  # a copy has (near) -inf entropy


# ---------------------------------------------------------------- functional


def test_kl_and_tv_from_logits():
    p, q = torch.tensor([0.0, 0.0]), torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_from_logits(p, q).item() == pytest.approx(expected)
    assert tv_from_logits(p, q).item() == pytest.approx(0.25)
    x = torch.randn(4, 50, generator=gen())
    assert kl_from_logits(x, x).abs().max() < 1e-12
    assert torch.allclose(kl_from_logits(x, x + 7.0), torch.zeros(4, dtype=torch.float64), atol=1e-12)


def test_kl_is_stable_for_extreme_logits():
    p = torch.tensor([1e4, 0.0, -1e4])
    q = torch.tensor([0.0, 1e4, -float("inf")])
    kl = kl_from_logits(p, q)
    assert torch.isfinite(kl) and kl.item() == pytest.approx(1e4)
    kl_tv = kl_from_logits(torch.randn(3, 9, generator=gen()), torch.randn(3, 9, generator=gen(1)))
    tv = tv_from_logits(torch.randn(3, 9, generator=gen()), torch.randn(3, 9, generator=gen(1)))
    assert torch.all(tv <= torch.sqrt(kl_tv / 2) + 1e-12)  # Pinsker


def test_hidden_distance_from_rho_identity():
    a, b = torch.randn(10, 8, generator=gen()), torch.randn(10, 8, generator=gen(1))
    rho = normalised_cosine_distance(a, b).numpy()
    direct = hidden_distance(a, b).numpy()
    via_rho = hidden_distance_from_rho(a.double().norm(dim=-1).numpy(), b.double().norm(dim=-1).numpy(), rho)
    assert np.allclose(direct, via_rho, atol=1e-10)


def test_lipschitz_on_a_linear_map():
    g = np.random.default_rng(0)
    d_hid = g.random(100) + 0.1
    d_out = 3.0 * d_hid * g.uniform(0.5, 1.0, 100)  # slopes in [1.5, 3]
    k = lipschitz_estimate(d_out, d_hid)
    assert k == pytest.approx((d_out / d_hid).max()) and k <= 3.0
    res = lipschitz_bound(d_out, d_hid)
    assert res["holds"] and res["bound"] == pytest.approx(k * d_hid.mean()) and 0.5 < res["tightness"] <= 1.0
    low = lipschitz_bound(d_out, d_hid, lipschitz=1.0)  # a too-small constant: the bound fails
    assert not low["holds"]
    assert lipschitz_estimate(d_out, d_hid, quantile=0.5) < k
    assert math.isnan(lipschitz_estimate([1.0], [0.0]))  # no hidden change: no slope


# ---------------------------------------------------------------- VAR


def test_vision_attention_by_hand():
    # one example, tokens: text(system), vision, vision, text(question), padding
    attn = torch.zeros(1, 2, 5, 5)
    attn[0, :, 0, 0] = 1.0
    attn[0, 0, 3, :4] = torch.tensor([0.1, 0.2, 0.3, 0.4])  # mass on vision 0.5
    attn[0, 1, 3, :4] = torch.tensor([0.25, 0.5, 0.25, 0.0])  # mass on vision 0.75
    attn[0, :, 4, :] = 0.2  # the padding query, never counted
    vision = torch.tensor([[False, True, True, False, False]])
    text = torch.tensor([[True, False, False, True, False]])
    valid = torch.tensor([[True, True, True, True, False]])
    mass, share, counted = vision_attention_terms(attn, text, vision, valid)
    assert counted.tolist() == [[False, False, False, True, False]]  # query 0 sees no vision key
    assert mass[0, 3].item() == pytest.approx(0.625) and share[0, 3].item() == pytest.approx(0.5)
    n = counted.sum().double()
    res = var_from_sums(np.array([[mass.sum()]]), np.array([[share.sum()]]), np.array([[n]]))
    assert res["var"]["mean"][0] == pytest.approx(0.625)
    assert res["var_normalised"]["mean"][0] == pytest.approx(1.25)


def test_uniform_attention_has_no_preference():
    q = k = 6
    causal = torch.ones(q, k).tril()
    attn = (causal / causal.sum(-1, keepdim=True)).expand(2, 3, q, k)
    vision = torch.tensor([[False, True, True, True, False, False]] * 2)
    valid = torch.ones(2, k, dtype=torch.bool)
    mass, share, counted = vision_attention_terms(attn, ~vision, vision, valid)
    assert torch.allclose(mass[counted], share[counted])
    assert (mass.sum() / share.sum()).item() == pytest.approx(1.0)


def test_vision_attention_decode_step_uses_last_positions():
    attn = torch.tensor([[[[0.5, 0.3, 0.2]]]])  # one generated query at position 2
    vision = torch.tensor([[True, False, False]])
    generated = torch.tensor([[False, False, True]])
    mass, share, counted = vision_attention_terms(attn, generated, vision, torch.ones(1, 3, dtype=torch.bool))
    assert counted.tolist() == [[True]] and mass.item() == pytest.approx(0.5) and share.item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------- CKA and decision stability


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_identity_and_invariances(debiased):
    x = torch.randn(60, 10, generator=gen(), dtype=torch.float64)
    y = x @ torch.randn(10, 6, generator=gen(1), dtype=torch.float64) + torch.randn(60, 6, generator=gen(2))
    assert linear_cka(x, x, debiased) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen(3), dtype=torch.float64))
    base = linear_cka(x, y, debiased)
    assert linear_cka(x @ q * 5.0 + 2.0, y, debiased) == pytest.approx(base, abs=1e-10)
    assert 0.2 < base < 1.0


def test_biased_cka_matches_feature_space_formula():
    x = torch.randn(30, 5, generator=gen(), dtype=torch.float64)
    y = torch.randn(30, 7, generator=gen(1), dtype=torch.float64)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y, debiased=False) == pytest.approx(expected.item())


def test_debiased_hsic_matches_the_zero_diagonal_formula():
    x = torch.randn(12, 3, generator=gen(), dtype=torch.float64)
    y = x[:, :2] ** 2 + torch.randn(12, 2, generator=gen(1), dtype=torch.float64)

    def hsic(k, g):  # Song et al. 2012, eq. 5, written out with explicit zero-diagonal Grams
        n = k.shape[0]
        k, g = k - torch.diag(k.diagonal()), g - torch.diag(g.diagonal())
        one = torch.ones(n, 1, dtype=torch.float64)
        value = torch.trace(k @ g) + (one.T @ k @ one) * (one.T @ g @ one) / ((n - 1) * (n - 2))
        return (value - 2 / (n - 2) * (one.T @ k @ g @ one)).item() / (n * (n - 3))

    k, g = x @ x.T, y @ y.T
    expected = hsic(k, g) / math.sqrt(hsic(k, k) * hsic(g, g))
    assert cka_from_grams(k, g) == pytest.approx(expected, rel=1e-10)


def test_debiased_cka_near_zero_for_independent_features():
    x = torch.randn(400, 20, generator=gen(), dtype=torch.float64)
    y = torch.randn(400, 20, generator=gen(1), dtype=torch.float64)
    assert abs(linear_cka(x, y)) < 0.05 < linear_cka(x, y, debiased=False)


def test_select_and_decision_stability():
    cos = [0.5, 0.01, 0.02, 0.3, 0.03, float("nan")]
    assert select_redundant(cos, threshold=0.025) == [1, 2]
    assert select_redundant(cos, top_k=3) == [1, 2, 4]
    same_order = [0.9, 0.1, 0.2, 0.8, 0.3, float("nan")]
    other = [0.1, 0.2, 0.9, 0.8, 0.3, 0.4]
    res = decision_stability({"cosine": cos, "angular": same_order, "cka": other}, threshold=0.025)
    assert res["selected"]["angular"] == [1, 2] and not res["changed"]["angular"]
    assert res["selected"]["cka"] == [0, 1] and res["changed"]["cka"]
    assert res["added"]["cka"] == [0] and res["removed"]["cka"] == [2] and res["jaccard"]["cka"] == pytest.approx(1 / 3)
    assert res["spearman"]["angular"] == pytest.approx(1.0)
    by_threshold = decision_stability({"cosine": cos, "cka": other}, threshold=0.025, thresholds={"cka": 0.35})
    assert by_threshold["selected"]["cka"] == [0, 1, 4]


def test_spearman_with_ties():
    assert spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
