"""Accumulators: streaming = one pass, shards merge exactly, round trips, padding, errors, known answers."""

import math

import numpy as np
import pytest
import torch

from skipit.errors import SkipitError
from skipit.measures import normalised_cosine_distance
from skipit.stats import (
    AttentionStats,
    LayerStats,
    MeasureConfig,
    StatsConfig,
    example_hash,
    poisson_weights,
    token_keys,
)

L, D = 3, 8
CFG = StatsConfig(n_bins=1000, n_bootstrap=20, sketch_size=40)
MCFG = MeasureConfig(grid_codes=(4,), grid_components=(2, 4), n_codes=4, n_components=2)
IDS = [f"ex{i}" for i in range(12)]


def example(eid: str):
    """States [L+1, n, D] and vision mask [n] of one example, a function of its id only."""
    i = int(eid[2:])
    g = torch.Generator().manual_seed(i)
    n = 6 + i % 5
    xs = [torch.randn(n, D, generator=g)]
    for layer in range(1, L + 1):
        xs.append(xs[-1] + 0.3 * layer * torch.randn(n, D, generator=g))
    vision = torch.zeros(n, dtype=torch.bool)
    vision[1:5] = True
    return torch.stack(xs), vision


def batch(ids, left=False, extra=0, garbage=float("nan")):
    """Padded batch; padding (and `extra` more padded columns) filled with garbage."""
    parts = [example(e) for e in ids]
    t = max(x.shape[1] for x, _ in parts) + extra
    hs = torch.full((L + 1, len(ids), t, D), garbage)
    vision = torch.zeros(len(ids), t, dtype=torch.bool)
    valid = torch.zeros(len(ids), t, dtype=torch.bool)
    for b, (x, v) in enumerate(parts):
        n = x.shape[1]
        sl = slice(t - n, t) if left else slice(0, n)
        hs[:, b, sl], vision[b, sl], valid[b, sl] = x, v, True
    return list(hs), {"vision": vision, "text": valid & ~vision}, valid


def one_pass(ids=IDS, **kw):
    st = LayerStats(L, D, config=CFG)
    hs, masks, valid = batch(ids, **kw)
    st.update(ids, hs, masks, valid)
    return st


def streamed(ids, sizes=(1, 3, 2), left=True):
    st = LayerStats(L, D, config=CFG)
    i, k = 0, 0
    while i < len(ids):
        chunk = ids[i : i + sizes[k % len(sizes)]]
        hs, masks, valid = batch(chunk, left=left, extra=k % 2)
        st.update(chunk, hs, masks, valid)
        i, k = i + len(chunk), k + 1
    return st


def assert_same_stats(a: LayerStats, b: LayerStats):
    assert torch.equal(a.counts, b.counts) and torch.equal(a.hist, b.hist)  # exact
    assert torch.allclose(a.sums, b.sums, rtol=0, atol=1e-10)
    for m in a.modalities:
        assert torch.equal(a.sketches[m].keys, b.sketches[m].keys)
        assert torch.equal(a.sketches[m].example_hash, b.sketches[m].example_hash)
        assert torch.equal(a.sketches[m].states, b.sketches[m].states)


def assert_close(x, y, tol=1e-10):
    if isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            assert_close(x[k], y[k], tol)
    elif isinstance(x, list):
        assert len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            assert_close(u, v, tol)
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, abs=tol)
    else:
        assert x == y


def test_streaming_small_batches_equals_one_batch():
    a, b = one_pass(), streamed(IDS)
    assert_same_stats(a, b)
    assert_close(a.finalize(MCFG), b.finalize(MCFG))


def test_two_shards_merge_equals_one_pass_in_any_order():
    full = one_pass()
    ab = streamed(IDS[:5]).merge(streamed(IDS[5:], sizes=(4,)))
    ba = streamed(IDS[5:], sizes=(2,)).merge(streamed(IDS[:5]))
    assert_same_stats(full, ab)
    assert_same_stats(full, ba)
    assert_close(full.finalize(MCFG), ab.finalize(MCFG))


def test_state_dict_and_file_round_trip(tmp_path):
    st = streamed(IDS[:7])
    clone = LayerStats.from_state_dict(st.state_dict())
    assert_same_stats(st, clone)
    st.save(tmp_path / "stats.safetensors")
    loaded = LayerStats.load(tmp_path / "stats.safetensors")
    assert_same_stats(st, loaded)
    hs, masks, valid = batch(IDS[7:])  # a reloaded accumulator keeps accumulating
    loaded.update(IDS[7:], hs, masks, valid)
    assert_same_stats(loaded, one_pass())


def test_tokens_of_an_example_may_arrive_over_several_calls():
    whole = one_pass()
    split = LayerStats(L, D, config=CFG)
    hs, masks, valid = batch(IDS)
    index = valid.long().cumsum(1) - 1
    for cols in (slice(0, 4), slice(4, None)):  # e.g. the prompt, then generated tokens
        split.update(IDS, [h[:, cols] for h in hs], {m: v[:, cols] for m, v in masks.items()}, valid[:, cols],
                     token_index=index[:, cols])
    assert_same_stats(whole, split)


def test_sketch_storage_dtype_round_trips(tmp_path):
    st = LayerStats(L, D, config=StatsConfig(n_bins=100, n_bootstrap=5, sketch_size=16, sketch_dtype="bfloat16"))
    hs, masks, valid = batch(IDS[:4])
    st.update(IDS[:4], hs, masks, valid)
    st.save(tmp_path / "bf16.safetensors")
    loaded = LayerStats.load(tmp_path / "bf16.safetensors")
    assert loaded.sketches["vision"].states.dtype == torch.bfloat16
    assert_same_stats(st, loaded)


def test_empty_sketch_round_trips(tmp_path):
    st = LayerStats(L, D, modalities=("vision", "text", "generated"), config=CFG)
    st.save(tmp_path / "s.safetensors")
    assert len(LayerStats.load(tmp_path / "s.safetensors").sketches["generated"].keys) == 0


def test_padding_is_excluded():
    clean = one_pass()
    for garbage in (float("nan"), float("inf"), 1e6):
        noisy = LayerStats(L, D, config=CFG)
        hs, masks, valid = batch(IDS, left=True, extra=3, garbage=garbage)
        masks = {m: mask | ~valid for m, mask in masks.items()}  # masks claim the padding too
        noisy.update(IDS, hs, masks, valid)
        assert_same_stats(clean, noisy)


def test_non_finite_valid_state_names_layer_and_example():
    hs, masks, valid = batch(IDS[:3])
    hs[2][1, 0, 3] = float("nan")
    with pytest.raises(SkipitError, match=r"X_2 \(the output of decoder layer 1\).*'ex1'"):
        LayerStats(L, D, config=CFG).update(IDS[:3], hs, masks, valid)
    hs, masks, valid = batch(IDS[:3])
    hs[0][2, 1, 0] = -float("inf")
    with pytest.raises(SkipitError, match=r"X_0.*'ex2'"):
        LayerStats(L, D, config=CFG).update(IDS[:3], hs, masks, valid)


def test_bad_inputs_are_user_errors():
    hs, masks, valid = batch(IDS[:2])
    st = LayerStats(L, D, config=CFG)
    with pytest.raises(SkipitError, match="hidden states"):
        st.update(IDS[:2], hs[:-1], masks, valid)
    with pytest.raises(SkipitError, match="unknown modalities"):
        st.update(IDS[:2], hs, {**masks, "audio": valid}, valid)
    with pytest.raises(SkipitError, match="unique"):
        st.update(["a", "a"], hs, masks, valid)
    with pytest.raises(SkipitError, match="merge"):
        st.merge(LayerStats(L, D, config=StatsConfig(n_bins=10)))
    with pytest.raises(SkipitError, match="another setup"):
        st.load_state_dict(LayerStats(L + 1, D, config=CFG).state_dict())


def test_known_geometric_answers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.cat([torch.randn(2, 5, 4, generator=g), torch.zeros(2, 5, 4)], -1)
    x2 = torch.cat([torch.zeros(2, 5, 4), torch.randn(2, 5, 4, generator=g)], -1)
    hs = [x0, 2 * x0, x2, -x2]  # same direction, orthogonal, antipodal
    st = LayerStats(3, 8, modalities=("text",), config=CFG)
    st.update(["a", "b"], hs, {"text": torch.ones(2, 5, dtype=torch.bool)})
    geo = st.finalize(MeasureConfig(informational=False, cka=False))["modalities"]["text"]["geometric"]
    for name, expected in (("rho", [0, 0.5, 1]), ("angular", [0, 0.5, 1]), ("block_influence", [0, 1, 2])):
        assert geo[name]["mean"] == pytest.approx(expected, abs=1e-9)
        assert geo[name]["ci_low"] == pytest.approx(expected, abs=1e-9)  # no spread: a zero-width interval
        assert geo[name]["ci_high"] == pytest.approx(expected, abs=1e-9)
    assert st.tail_probability(0.25)[:, 0].tolist() == [0.0, 1.0, 1.0]


def test_tail_probability_matches_empirical_fraction():
    st = one_pass()
    hs, masks, valid = batch(IDS)
    for layer in range(1, L + 1):
        rho = normalised_cosine_distance(hs[layer - 1], hs[layer])
        for j, m in enumerate(st.modalities):
            sel = rho[masks[m]]
            for delta in (0.0, 0.05, 0.1, 0.2, 0.3):
                expected = (sel > delta).double().mean().item()
                assert st.tail_probability(delta)[layer - 1, j] == pytest.approx(expected, abs=1e-12)


def test_geometric_mean_matches_direct_computation_and_ci_brackets_it():
    st = one_pass()
    res = st.finalize(MeasureConfig(informational=False, cka=False))["modalities"]["vision"]["geometric"]["rho"]
    hs, masks, _ = batch(IDS)
    for layer in range(1, L + 1):
        direct = normalised_cosine_distance(hs[layer - 1], hs[layer])[masks["vision"]].mean().item()
        assert res["mean"][layer - 1] == pytest.approx(direct, abs=1e-12)
        assert res["ci_low"][layer - 1] < direct < res["ci_high"][layer - 1]


def test_sketch_is_the_bottom_k_of_all_tokens_and_bounded():
    st = streamed(IDS)
    for m in ("vision", "text"):
        rows = []
        for e in IDS:
            x, vision = example(e)
            keep = vision if m == "vision" else ~vision
            keys = token_keys(example_hash([e]), np.arange(x.shape[1])[None], CFG.seed)[0]
            rows += [(int(k), x[:, t]) for t, k in enumerate(keys) if keep[t]]
        rows.sort(key=lambda r: r[0])
        best = rows[: CFG.sketch_size]
        sk = st.sketches[m]
        assert len(rows) > CFG.sketch_size == len(sk.keys)
        assert sk.keys.tolist() == [k for k, _ in best]
        assert torch.equal(sk.states, torch.stack([s for _, s in best]))


def test_poisson_weights_are_deterministic_and_poisson():
    h = example_hash([f"id{i}" for i in range(20000)])
    w = poisson_weights(h, 3, seed=0)
    assert np.array_equal(w[:10], poisson_weights(h[:10], 3, seed=0))  # independent of what else is in the batch
    assert not np.array_equal(w, poisson_weights(h, 3, seed=1))
    assert w.mean() == pytest.approx(1.0, abs=0.02) and w.var() == pytest.approx(1.0, abs=0.03)
    assert (w == 0).mean() == pytest.approx(math.exp(-1), abs=0.01)


def test_informational_and_cka_on_copied_and_fresh_layers():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 20, 16, generator=g)
    hs = [x0, x0.clone(), torch.randn(6, 20, 16, generator=g)]  # layer 1 copies, layer 2 forgets
    st = LayerStats(2, 16, modalities=("text",), config=StatsConfig(n_bootstrap=20, sketch_size=100))
    st.update(list("abcdef"), hs, {"text": torch.ones(6, 20, dtype=torch.bool)})
    res = st.finalize(MeasureConfig(grid_codes=(4, 8), grid_components=(2,), n_codes=8, n_components=2))
    text = res["modalities"]["text"]
    info, cka = text["informational"], text["cka"]["value"]
    assert info["n_samples"] == 100
    assert info["h_cond"][0] == pytest.approx(0.0, abs=1e-12) and info["score"][0] == 0.0
    assert info["score"][1] > 0.6 and info["ci_low"][1] < info["ci_high"][1]
    assert cka[0] == pytest.approx(1.0) and abs(cka[1]) < 0.15
    assert text["decision_stability"]["selected"]["cka"] == [0]  # the copying layer


def attention_batch(ids):
    """Causal attention [B, 2, T, T] per example id, with right padding."""
    tensors = []
    for e in ids:
        g = torch.Generator().manual_seed(int(e[2:]))
        tensors.append(torch.randn(2, 7, 7, generator=g))
    scores = torch.stack(tensors).masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), -float("inf"))
    valid = torch.ones(len(ids), 7, dtype=torch.bool)
    for b, e in enumerate(ids):
        valid[b, -2:] = int(e[2:]) % 2 == 1  # even examples are two tokens shorter
    scores = scores.masked_fill(~valid[:, None, None, :], -float("inf"))
    attn = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0)
    vision = torch.zeros(len(ids), 7, dtype=torch.bool)
    vision[:, 1:4] = True
    return attn, {"vision": vision, "text": valid & ~vision}, valid


def test_attention_stats_stream_merge_round_trip():
    cfg = StatsConfig(n_bootstrap=10)
    one = AttentionStats(2, config=cfg)
    for layer in (0, 1):
        one.update(IDS, layer, *attention_batch(IDS))
    shard_a, shard_b = AttentionStats(2, config=cfg), AttentionStats(2, config=cfg)
    for layer in (0, 1):
        for chunk in (IDS[:3], IDS[3:5]):
            shard_a.update(chunk, layer, *attention_batch(chunk))
        shard_b.update(IDS[5:], layer, *attention_batch(IDS[5:]))
    merged = AttentionStats.from_state_dict(shard_a.merge(shard_b).state_dict())
    a, b = one.finalize(), merged.finalize()
    assert_close(a, b)
    assert a["n_queries"][0] == sum(1 if i % 2 == 0 else 3 for i in range(12))  # valid text queries after the image


def test_attention_stats_matches_hand_computation():
    attn, masks, valid = attention_batch(IDS[:2])
    st = AttentionStats(1, config=StatsConfig(n_bootstrap=5))
    st.update(IDS[:2], 0, attn, masks, valid)
    res = st.finalize()
    masses, shares = [], []
    for b in range(2):
        for q in range(7):
            if masks["text"][b, q] and q >= 1:  # a text query that sees a vision key
                masses.append(attn[b, :, q, 1:4].sum(-1).mean().item())
                visible = valid[b, : q + 1]
                shares.append(masks["vision"][b, : q + 1].sum().item() / visible.sum().item())
    assert res["n_queries"] == [len(masses)]
    assert res["var"]["mean"][0] == pytest.approx(np.mean(masses))
    assert res["var_normalised"]["mean"][0] == pytest.approx(sum(masses) / sum(shares))
    assert res["expected_share"][0] == pytest.approx(np.mean(shares))


def test_attention_stats_errors():
    attn, masks, valid = attention_batch(IDS[:2])
    st = AttentionStats(1)
    with pytest.raises(SkipitError, match="outside"):
        st.update(IDS[:2], 1, attn, masks, valid)
    attn[1, 0, 5, 2] = float("nan")
    with pytest.raises(SkipitError, match="layer 0.*'ex1'"):
        st.update(IDS[:2], 0, attn, masks, valid)
