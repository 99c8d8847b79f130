"""Retrieval metrics against hand-computed examples and a brute-force (python loops, argsort) reference."""

from __future__ import annotations

import itertools
import math
import statistics
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidret.errors import VidretError
from vidret.eval.metrics import (
    SimilarityError,
    Ties,
    dual_softmax,
    format_metrics,
    gt_ranks,
    metrics_from_rank_bounds,
    metrics_from_ranks,
    qb_norm,
    rank_bounds,
    retrieval_metrics,
    t2v_metrics,
    v2t_metrics_multi,
    v2t_multi_rank_bounds,
    v2t_multi_ranks,
)

KEYS = ("R1", "R5", "R10", "MdR", "MnR")

# --------------------------------------------------------------------------- brute-force reference


def bf_rank(row: list[float], g: int, ties: Ties) -> int:
    """Argsort (descending) with the tie-break written out: gt first among equals, or last."""
    if ties == "optimistic":
        order = sorted(range(len(row)), key=lambda j: (-row[j], j != g))
    else:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == g))
    return order.index(g) + 1


def bf_metrics_from_ranks(ranks: list[int]) -> dict[str, float]:
    n = len(ranks)
    out: dict[str, float] = {f"R{k}": 100.0 * sum(r <= k for r in ranks) / n for k in (1, 5, 10)}
    out["MdR"] = float(statistics.median(ranks))
    out["MnR"] = float(statistics.mean(ranks))
    out["n_queries"] = n
    return out


def bf_ranks(sim: torch.Tensor, gt: list[int] | None, ties: Ties) -> list[int]:
    rows = sim.tolist()
    gt = list(range(len(rows))) if gt is None else gt
    return [bf_rank(row, g, ties) for row, g in zip(rows, gt)]


def bf_v2t_multi_ranks(sim_tv: torch.Tensor, t2v: list[int], ties: Ties) -> list[int]:
    rows = sim_tv.tolist()  # [N_text][N_video]
    n_video = len(rows[0])
    ranks = []
    for v in range(n_video):
        group_scores = []
        for u in range(n_video):
            group_scores.append(max(rows[c][v] for c in range(len(rows)) if t2v[c] == u))
        ranks.append(bf_rank(group_scores, v, ties))
    return ranks


def assert_metrics_equal(a: dict[str, float], b: dict[str, float]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-12), key


# --------------------------------------------------------------------------- hand examples


def test_hand_3x3_ranks_1_2_3() -> None:
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # gt 0 is best -> rank 1
            [0.8, 0.5, 0.1],  # gt 1 beaten by item 0 -> rank 2
            [0.9, 0.8, 0.1],  # gt 2 beaten by items 0, 1 -> rank 3
        ]
    )
    assert gt_ranks(sim).tolist() == [1, 2, 3]
    m = retrieval_metrics(sim)
    assert m["R1"] == pytest.approx(100 / 3)
    assert m["R5"] == 100.0 and m["R10"] == 100.0
    assert m["MdR"] == 2.0 and m["MnR"] == 2.0
    assert m["n_queries"] == 3


def test_hand_recall_cutoffs_and_even_median() -> None:
    # Item j scores 12 - j, so item j has rank j + 1 in every row; gts at items 0, 4, 5, 10.
    sim = torch.arange(12, 0, -1, dtype=torch.float32).repeat(4, 1)
    gt = torch.tensor([0, 4, 5, 10])
    m = retrieval_metrics(sim, gt)
    # ranks 1, 5, 6, 11: R@1 1/4, R@5 2/4, R@10 3/4; median of 5 and 6; mean 23/4.
    assert (m["R1"], m["R5"], m["R10"]) == (25.0, 50.0, 75.0)
    assert m["MdR"] == 5.5  # numpy-style median, not torch.median's lower middle (5)
    assert m["MnR"] == 5.75


def test_hand_ties_both_policies() -> None:
    sim = torch.tensor(
        [
            [0.5, 0.5, 0.5],  # gt 1 tied with everything: optimistic 1, pessimistic 3
            [0.7, 0.2, 0.7],  # gt 2 tied with item 0: optimistic 1, pessimistic 2
            [0.9, 0.3, 0.3],  # gt 1: item 0 higher, item 2 tied: optimistic 2, pessimistic 3
        ]
    )
    gt = torch.tensor([1, 2, 1])
    assert gt_ranks(sim, gt).tolist() == [1, 1, 2]
    assert gt_ranks(sim, gt, ties="pessimistic").tolist() == [3, 2, 3]
    m = retrieval_metrics(sim, gt, ties="pessimistic")
    assert m["R1"] == 0.0 and m["MdR"] == 3.0 and m["MnR"] == pytest.approx(8 / 3)


def test_ties_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vidret.eval.metrics"):
        retrieval_metrics(torch.ones(4, 4))
    assert "4 of 4 queries tie" in caplog.text


def test_hand_non_square_gt() -> None:
    sim = torch.tensor([[0.1, 0.4, 0.3, 0.2], [0.0, 0.9, -1.0, 0.5]])
    m = retrieval_metrics(sim, torch.tensor([3, 2]))  # ranks 3 and 4
    assert m == {"R1": 0.0, "R5": 100.0, "R10": 100.0, "MdR": 3.5, "MnR": 3.5, "n_queries": 2}


def test_infinite_scores_are_ranked() -> None:
    sim = torch.tensor([[math.inf, 1.0], [-math.inf, 0.0]])
    assert gt_ranks(sim).tolist() == [1, 1]
    assert gt_ranks(sim, torch.tensor([1, 0])).tolist() == [2, 2]


def test_format_metrics() -> None:
    d = {"R1": 45.23, "R5": 71.0, "R10": 80.26, "MdR": 2.0, "MnR": 14.14, "n_queries": 10}
    assert format_metrics(d) == "R@1 45.2 R@5 71.0 R@10 80.3 MdR 2.0 MnR 14.1"
    with pytest.raises(SimilarityError, match="MnR"):
        format_metrics({k: 1.0 for k in KEYS[:-1]})


# --------------------------------------------------------------------------- against the reference

SHAPES = [(1, 1), (1, 7), (7, 1), (5, 5), (7, 3), (3, 7), (20, 50), (64, 64), (50, 20)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize("kind", ["int_valued", "continuous"])
def test_random_matrices_match_reference(shape: tuple[int, int], ties: Ties, kind: str) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, ties, kind)).encode()))
    n_q, n_i = shape
    if kind == "int_valued":  # few distinct values: many ties, including at the ground truth
        sim = torch.randint(0, 4, shape, generator=g).float()
    else:
        sim = torch.randn(shape, generator=g)
    gts: list[list[int] | None] = [torch.randint(0, n_i, (n_q,), generator=g).tolist()]
    if n_q == n_i:
        gts.append(None)
    for gt in gts:
        gt_t = None if gt is None else torch.tensor(gt)
        ref = bf_ranks(sim, gt, ties)
        assert gt_ranks(sim, gt_t, ties=ties).tolist() == ref
        got = retrieval_metrics(sim, gt_t, ties=ties)
        assert_metrics_equal(got, bf_metrics_from_ranks(ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32])
def test_dtypes_agree_with_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    sim = torch.randint(-8, 8, (30, 40), generator=g)  # exactly representable in every dtype
    gt = torch.randint(0, 40, (30,), generator=g, dtype=torch.int32)  # int32 gt accepted too
    for ties in ("optimistic", "pessimistic"):
        ref = gt_ranks(sim.float(), gt, ties=ties)
        assert torch.equal(gt_ranks(sim.to(dtype), gt, ties=ties), ref)


def test_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 6, (301, 257), generator=g).float()
    gt = torch.randint(0, 257, (301,), generator=g)
    full = retrieval_metrics(sim, gt, chunk_size=10_000)
    ranks_full = gt_ranks(sim, gt, chunk_size=10_000)
    for chunk in (1, 7, 300, None):
        assert torch.equal(gt_ranks(sim, gt, chunk_size=chunk), ranks_full)
        assert retrieval_metrics(sim, gt, chunk_size=chunk) == full
    # A transposed (non-contiguous) view is fine and is V2T of the same matrix.
    sq = sim[:257]
    ref_v2t = (sq.diagonal()[:, None] < sq.T).sum(1) + 1  # vectorised one-shot reference
    for chunk in (1, 13, None):
        assert torch.equal(gt_ranks(sq.T, chunk_size=chunk), ref_v2t)


def test_medium_matrix_matches_vectorised_reference() -> None:
    g = torch.Generator().manual_seed(1)
    sim = torch.randn(1500, 1500, generator=g)
    sim += 3 * torch.eye(1500)  # a realistic mix of ranks
    ref = (sim > sim.diagonal()[:, None]).sum(1) + 1
    assert torch.equal(gt_ranks(sim, chunk_size=64), ref)
    assert retrieval_metrics(sim)["MnR"] == pytest.approx(ref.double().mean().item())


# --------------------------------------------------------------------------- errors


def test_nan_raises_even_in_a_late_chunk() -> None:
    sim = torch.randn(6, 6)
    sim[5, 2] = math.nan  # not at a ground truth, in the last chunk
    for chunk in (1, 2, None):
        with pytest.raises(ValueError, match="NaN"):
            retrieval_metrics(sim, chunk_size=chunk)
    with pytest.raises(VidretError, match="NaN"):  # the CLI catches it and prints the message
        retrieval_metrics(sim.T)
    with pytest.raises(ValueError, match="NaN"):
        v2t_metrics_multi(sim, torch.arange(6))
    with pytest.raises(ValueError, match="NaN"):
        dual_softmax(sim)
    with pytest.raises(ValueError, match="NaN"):
        qb_norm(sim, torch.randn(3, 6))
    with pytest.raises(ValueError, match="NaN"):
        qb_norm(torch.randn(3, 6), sim)


@pytest.mark.parametrize(
    ("sim", "gt", "match"),
    [
        (torch.randn(3, 4), None, "square"),
        (torch.randn(3, 4), torch.tensor([0, 1]), r"shape \[3\]"),
        (torch.randn(3, 4), torch.tensor([0, 1, 4]), "outside"),
        (torch.randn(3, 4), torch.tensor([0, -1, 2]), "outside"),
        (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (torch.randn(4), None, "2-D"),
        (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), "at least one"),
        (torch.ones(2, 2, dtype=torch.bool), None, "real scores"),
    ],
)
def test_bad_inputs_raise(sim: torch.Tensor, gt: torch.Tensor | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(sim, gt)


def test_bad_options_raise() -> None:
    sim = torch.randn(3, 3)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(sim, ties="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(sim, chunk_size=0)
    with pytest.raises(ValueError, match="1-indexed"):
        metrics_from_ranks(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        dual_softmax(sim, temperature=0.0)
    with pytest.raises(ValueError, match="same item set"):
        qb_norm(sim, torch.randn(5, 4))
    with pytest.raises(ValueError, match="k must be"):
        qb_norm(sim, torch.randn(5, 3), k=4)
    with pytest.raises(ValueError, match="beta"):
        qb_norm(sim, torch.randn(5, 3), beta=-1.0)


# --------------------------------------------------------------------------- multi-caption protocol


def test_multi_caption_hand_example() -> None:
    # 3 captions, 2 videos; captions 0, 1 describe video 0, caption 2 describes video 1.
    sim = torch.tensor(
        [
            [0.2, 0.9],  # c0
            [0.7, 0.1],  # c1
            [0.8, 0.95],  # c2
        ]
    )
    t2v = torch.tensor([0, 0, 1])
    # T2V: c0 -> rank 2, c1 -> rank 1, c2 -> rank 1.
    t = t2v_metrics(sim, t2v)
    assert t["R1"] == pytest.approx(200 / 3) and t["MdR"] == 1.0 and t["MnR"] == pytest.approx(4 / 3)
    # V2T, query v0: group 0 = max(0.2, 0.7) = 0.7, group 1 = 0.8 -> own group rank 2.
    #      query v1: group 0 = max(0.9, 0.1) = 0.9, group 1 = 0.95 -> own group rank 1.
    assert v2t_multi_ranks(sim, t2v).tolist() == [2, 1]
    v = v2t_metrics_multi(sim, t2v)
    assert v == {"R1": 50.0, "R5": 100.0, "R10": 100.0, "MdR": 1.5, "MnR": 1.5, "n_queries": 2}


@pytest.mark.parametrize("ties", ["optimistic", "pessimistic"])
@pytest.mark.parametrize(("n_text", "n_video"), [(1, 1), (5, 5), (12, 4), (40, 7), (60, 20)])
def test_multi_caption_matches_reference(ties: Ties, n_text: int, n_video: int) -> None:
    g = torch.Generator().manual_seed(n_text * 100 + n_video)
    t2v = torch.cat([torch.arange(n_video), torch.randint(0, n_video, (n_text - n_video,), generator=g)])
    t2v = t2v[torch.randperm(n_text, generator=g)]  # captions of a video are not contiguous
    sim = torch.randint(0, 5, (n_text, n_video), generator=g).float()
    ref = bf_v2t_multi_ranks(sim, t2v.tolist(), ties)
    for chunk in (1, 3, None):
        assert v2t_multi_ranks(sim, t2v, ties=ties, chunk_size=chunk).tolist() == ref
    assert_metrics_equal(v2t_metrics_multi(sim, t2v, ties=ties), bf_metrics_from_ranks(ref))
    assert_metrics_equal(
        t2v_metrics(sim, t2v, ties=ties),
        bf_metrics_from_ranks(bf_ranks(sim, t2v.tolist(), ties)),
    )


def test_one_caption_per_video_reduces_to_plain_v2t() -> None:
    g = torch.Generator().manual_seed(5)
    sim_vt = torch.randn(30, 30, generator=g)  # [N_video, N_text] with text j describing video j
    perm = torch.randperm(30, generator=g)  # shuffle the captions
    sim_tv = sim_vt.T[perm]  # [N_text, N_video]
    assert torch.equal(v2t_multi_ranks(sim_tv, perm), gt_ranks(sim_vt))


def test_video_without_caption_raises() -> None:
    with pytest.raises(ValueError, match="no caption"):
        v2t_metrics_multi(torch.randn(3, 3), torch.tensor([0, 0, 2]))


# --------------------------------------------------------------------------- DSL


def test_dual_softmax_hand_example() -> None:
    # temperature 1/ln 3: exp(s / T) = 3**s. Column 0: [3^2, 3^0] -> prior [0.9, 0.1];
    # column 1: [3^3, 3^3] -> [0.5, 0.5]. Video 1 is a hub that every text likes.
    sim = torch.tensor([[2.0, 3.0], [0.0, 3.0]], dtype=torch.float64)
    out = dual_softmax(sim, temperature=1 / math.log(3))
    torch.testing.assert_close(out, torch.tensor([[1.8, 1.5], [0.0, 1.5]], dtype=torch.float64))
    assert retrieval_metrics(sim)["R1"] == 50.0
    assert retrieval_metrics(out)["R1"] == 100.0  # the hub no longer wins text 0


def test_dual_softmax_matches_formula_chunked() -> None:
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(37, 23, generator=g, dtype=torch.float64) * 5
    ref = sim * torch.softmax(sim / 0.7, dim=0)
    for chunk in (1, 5, None):
        torch.testing.assert_close(dual_softmax(sim, temperature=0.7, chunk_size=chunk), ref)
    assert dual_softmax(sim.half()).dtype == torch.float32


def test_dual_softmax_keeps_what_it_should() -> None:
    g = torch.Generator().manual_seed(4)
    # Positive and diagonal-dominant both ways: each diagonal entry is its row's and column's max.
    sim = 0.5 * torch.rand(50, 50, generator=g) + torch.eye(50)
    assert retrieval_metrics(sim)["R1"] == 100.0
    assert retrieval_metrics(dual_softmax(sim, temperature=0.05))["R1"] == 100.0
    assert retrieval_metrics(dual_softmax(sim.T, temperature=0.05))["R1"] == 100.0
    # A very high temperature makes the prior uniform (1 / N_query): the ranking is unchanged.
    noisy = torch.randn(40, 60, generator=g, dtype=torch.float64)
    gt = torch.randint(0, 60, (40,), generator=g)
    assert torch.equal(gt_ranks(dual_softmax(noisy, temperature=1e9), gt), gt_ranks(noisy, gt))


# --------------------------------------------------------------------------- QB-Norm


def qb_norm_reference(test: torch.Tensor, bank: torch.Tensor, k: int, beta: float) -> torch.Tensor:
    """The authors' numpy procedure, written with python loops (argsort-based, no ties expected)."""
    t, b = test.tolist(), bank.tolist()
    n_item = len(t[0])
    active = set()
    for row in b:
        active |= set(sorted(range(n_item), key=lambda j: -row[j])[:k])
    norm = [sum(math.exp(beta * row[j]) for row in b) for j in range(n_item)]
    out = []
    for row in t:
        top1 = sorted(range(n_item), key=lambda j: -row[j])[0]
        out.append([math.exp(beta * row[j]) / norm[j] for j in range(n_item)] if top1 in active else row)
    return torch.tensor(out, dtype=torch.float64)


def test_qb_norm_hand_example() -> None:
    # beta = ln 2: exp(beta s) = 2**s. Both bank queries put item 0 first -> A = {0}.
    # Bank sums: item 0: 2^2 + 2^2 = 8, item 1: 2^0 + 2^0 = 2.
    bank = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    test = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    out = qb_norm(test, bank, k=1, beta=math.log(2))
    # Query 0's top-1 (item 0) is in A: [2^2 / 8, 2^1 / 2] = [0.5, 1.0], returned as logs.
    torch.testing.assert_close(out[0].exp(), torch.tensor([0.5, 1.0], dtype=torch.float64))
    # Query 1's top-1 (item 1) is not in A: untouched.
    torch.testing.assert_close(out[1], test[1])
    gt = torch.tensor([1, 1])
    assert gt_ranks(test, gt).tolist() == [2, 1]
    assert gt_ranks(out, gt).tolist() == [1, 1]  # the hub item 0 is demoted for query 0


@pytest.mark.parametrize("k", [1, 3])
def test_qb_norm_matches_authors_procedure(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    test = torch.rand(25, 12, generator=g, dtype=torch.float64)
    bank = torch.rand(40, 12, generator=g, dtype=torch.float64)
    bank[:, 3] += 1.0  # hubs: A = {3} for k = 1, {3, 7, 9} for k = 3
    bank[:, 7] += 0.9
    bank[:, 9] += 0.8
    test[0, 3] = 2.0  # query 0's top-1 is in A: normalised
    test[1, 0] = 2.0  # query 1's top-1 is not: untouched
    ref = qb_norm_reference(test, bank, k=k, beta=20.0)
    for chunk in (1, 7, None):
        out = qb_norm(test, bank, k=k, beta=20.0, chunk_size=chunk)
        normalised = ~torch.isclose(out, test).all(dim=1)
        assert normalised.any() and not normalised.all()  # the example exercises both branches
        torch.testing.assert_close(out[normalised].exp(), ref[normalised])
        torch.testing.assert_close(out[~normalised], ref[~normalised])


def test_qb_norm_keeps_what_it_should() -> None:
    g = torch.Generator().manual_seed(6)
    test = torch.randn(30, 8, generator=g)
    gt = torch.randint(0, 8, (30,), generator=g)
    # Every item gets the same multiset of bank scores (a circulant bank): the normaliser is the same
    # for all items, so normalised rows are shifted by a constant and no rank changes.
    base = torch.randn(8, generator=g)
    bank = torch.stack([base.roll(i) for i in range(8)])
    out = qb_norm(test, bank, k=2, beta=20.0)
    assert torch.equal(gt_ranks(out, gt), gt_ranks(test, gt))
    # An activation set no test query's top-1 falls in (item 0, never a top-1): nothing is touched.
    test[:, 0] = -10.0
    bank2 = torch.full((5, 8), -1.0)
    bank2[:, 0] = 1.0
    torch.testing.assert_close(qb_norm(test, bank2, k=1), test)
    assert not torch.equal(qb_norm(test, bank2, k=2), test)  # k = 2 activates more items: rows change


def test_qb_norm_large_logits_do_not_overflow() -> None:
    g = torch.Generator().manual_seed(7)
    test = 100 * torch.randn(10, 6, generator=g)  # logit-scale scores: exp(20 * s) overflows
    bank = 100 * torch.randn(20, 6, generator=g)
    out = qb_norm(test, bank, k=6)  # k = N_item: every item is active, every row normalised
    assert torch.isfinite(out).all()
    lse = torch.logsumexp(20.0 * bank, dim=0)
    torch.testing.assert_close(out, 20.0 * test - lse)


# --------------------------------------------------------------------------- properties


@st.composite
def sim_and_gt(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_q = draw(st.integers(1, 9))
    n_i = draw(st.integers(1, 9))
    vals = draw(st.lists(st.integers(0, 3), min_size=n_q * n_i, max_size=n_q * n_i))
    gt = draw(st.lists(st.integers(0, n_i - 1), min_size=n_q, max_size=n_q))
    item_perm = draw(st.permutations(range(n_i)))
    query_perm = draw(st.permutations(range(n_q)))
    sim = torch.tensor(vals, dtype=torch.float32).reshape(n_q, n_i)
    return sim, torch.tensor(gt), torch.tensor(item_perm), torch.tensor(query_perm)


@settings(max_examples=60, deadline=None)
@given(sim_and_gt(), st.sampled_from(("optimistic", "pessimistic", "expected")))
def test_property_permutation_invariance_and_reference(
    case: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], ties: Ties
) -> None:
    sim, gt, item_perm, query_perm = case
    base = retrieval_metrics(sim, gt, ties=ties)
    if ties == "expected":
        per_query = [bf_tie_break_ranks(row, int(k)) for row, k in zip(sim.tolist(), gt)] if sim.shape[1] <= 7 else []
        if per_query:
            assert_metrics_equal(base, bf_expected_metrics(per_query))
    else:
        assert_metrics_equal(base, bf_metrics_from_ranks(bf_ranks(sim, gt.tolist(), ties)))
    # Permute items: new item p holds old item item_perm[p]; old item i now sits where item_perm == i.
    new_pos = torch.argsort(item_perm)
    assert retrieval_metrics(sim[:, item_perm], new_pos[gt], ties=ties) == base
    # Permute queries together with their gt: ranks permute, metrics stay.
    ranks = gt_ranks(sim, gt, ties=ties)
    assert torch.equal(gt_ranks(sim[query_perm], gt[query_perm], ties=ties), ranks[query_perm])
    # A strictly increasing transform of the scores changes nothing.
    assert retrieval_metrics(3 * sim + 1, gt, ties=ties) == base


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_property_multi_caption_permutation_invariance(data: st.DataObject) -> None:
    n_video = data.draw(st.integers(1, 6))
    extra = data.draw(st.lists(st.integers(0, n_video - 1), max_size=8))
    t2v = torch.tensor(list(range(n_video)) + extra)
    n_text = len(t2v)
    vals = data.draw(st.lists(st.integers(0, 3), min_size=n_text * n_video, max_size=n_text * n_video))
    sim = torch.tensor(vals, dtype=torch.float32).reshape(n_text, n_video)
    base = v2t_metrics_multi(sim, t2v)
    assert_metrics_equal(base, bf_metrics_from_ranks(bf_v2t_multi_ranks(sim, t2v.tolist(), "optimistic")))
    cap_perm = torch.tensor(data.draw(st.permutations(range(n_text))))
    assert v2t_metrics_multi(sim[cap_perm], t2v[cap_perm]) == base  # caption order is irrelevant
    vid_perm = torch.tensor(data.draw(st.permutations(range(n_video))))
    new_pos = torch.argsort(vid_perm)
    # Relabel videos: columns permuted, caption labels remapped; the V2T ranks permute with the videos.
    ranks = v2t_multi_ranks(sim, t2v)
    assert torch.equal(v2t_multi_ranks(sim[:, vid_perm], new_pos[t2v]), ranks[vid_perm])


# --------------------------------------------------------------------------- devices and scale


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(8)
    sim = torch.randint(0, 5, (300, 200), generator=g).float()
    gt = torch.randint(0, 200, (300,), generator=g)
    t2v = torch.cat([torch.arange(200), torch.randint(0, 200, (100,), generator=g)])
    bank = torch.rand(50, 200, generator=g)
    cuda = torch.device("cuda")
    assert retrieval_metrics(sim.to(cuda), gt) == retrieval_metrics(sim, gt)  # gt may stay on the CPU
    assert v2t_metrics_multi(sim.to(cuda), t2v.to(cuda)) == v2t_metrics_multi(sim, t2v)
    torch.testing.assert_close(dual_softmax(sim.to(cuda)).cpu(), dual_softmax(sim))
    torch.testing.assert_close(qb_norm(sim.to(cuda), bank.to(cuda), k=2).cpu(), qb_norm(sim, bank, k=2))


@pytest.mark.slow
def test_20k_square_bounded_extra_memory() -> None:
    """20k x 20k (1.6 GB) in a fresh process: peak RSS grows by less than 200 MB while ranking."""
    script = textwrap.dedent(
        """
        import resource, time, torch
        from vidret.eval.metrics import gt_ranks, retrieval_metrics
        torch.manual_seed(0)
        warm = torch.randn(300, 300)  # page in the kernels' code first: only data growth is measured
        retrieval_metrics(warm), retrieval_metrics(warm.T)
        n = 20_000
        sim = torch.empty(n, n).normal_()
        sim.diagonal().add_(4.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        t2v = retrieval_metrics(sim)
        v2t = retrieval_metrics(sim.T)
        dt = time.perf_counter() - t0
        grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        head = sim[:64]
        ref = ((head > sim.diagonal()[:64, None]).sum(1) + 1)
        assert torch.equal(gt_ranks(sim)[:64], ref)
        print(f"grew_mb={grew_mb:.1f} seconds={dt:.1f} t2v_r1={t2v['R1']:.2f} v2t_r1={v2t['R1']:.2f}")
        assert grew_mb < 200, grew_mb
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "grew_mb=" in proc.stdout
    print(proc.stdout)  # the measured growth and time, shown with -s


# --------------------------------------------------------------------------- tie-aware ("expected") metrics


def bf_tie_break_ranks(row: list[float], g: int, tol: float = 0.0) -> list[int]:
    """Every equally likely rank of the ground truth: all orders of its tied group written out."""
    above = sum(1 for j, x in enumerate(row) if j != g and x > row[g] + tol)
    tied = [j for j, x in enumerate(row) if j != g and abs(x - row[g]) <= tol]
    return [above + perm.index(g) + 1 for perm in itertools.permutations([g, *tied])]


def bf_expected_metrics(per_query: list[list[int]]) -> dict[str, float]:
    n = len(per_query)
    out: dict[str, float] = {
        f"R{k}": 100.0 * sum(sum(r <= k for r in ranks) / len(ranks) for ranks in per_query) / n for k in (1, 5, 10)
    }
    means = [statistics.mean(ranks) for ranks in per_query]
    out["MdR"] = float(statistics.median(means))
    out["MnR"] = float(statistics.mean(means))
    out["n_queries"] = n
    out["tied_queries"] = sum(len(set(ranks)) > 1 for ranks in per_query)
    return out


def test_expected_ties_hand_example_reversal_pair() -> None:
    # two videos with the same frames in another order: an order-blind model gives them equal scores
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.9, 0.9, 0.1], [0.2, 0.3, 0.8]])
    assert retrieval_metrics(sim)["R1"] == 100.0  # optimistic: each twin "wins" its tie
    assert retrieval_metrics(sim, ties="pessimistic")["R1"] == pytest.approx(100 / 3)
    m = retrieval_metrics(sim, ties="expected")
    assert m["R1"] == pytest.approx(100 * (0.5 + 0.5 + 1) / 3) and m["R5"] == 100.0
    assert m["MnR"] == pytest.approx((1.5 + 1.5 + 1) / 3) and m["MdR"] == 1.5 and m["tied_queries"] == 2
    assert gt_ranks(sim, ties="expected").tolist() == [1.5, 1.5, 1.0]
    lo, hi = rank_bounds(sim)
    assert lo.tolist() == [1, 1, 1] and hi.tolist() == [2, 2, 1]


def test_expected_ties_equal_plain_metrics_without_ties() -> None:
    sim = torch.randn(40, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plain = retrieval_metrics(sim)
    expected = retrieval_metrics(sim, ties="expected")
    assert expected.pop("tied_queries") == 0
    assert expected == plain


@pytest.mark.parametrize("seed", range(6))
def test_expected_ties_match_brute_force_over_every_tie_break(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_q, n_i = 7, 6
    sim = torch.randint(0, 3, (n_q, n_i), generator=g).float()  # few values: many ties, some at the gt
    gt = torch.randint(0, n_i, (n_q,), generator=g)
    ref = bf_expected_metrics([bf_tie_break_ranks(row, int(k)) for row, k in zip(sim.tolist(), gt)])
    for chunk in (1, 4, None):
        assert_metrics_equal(retrieval_metrics(sim, gt, ties="expected", chunk_size=chunk), ref)
    # bounds are the brute force's extremes, expected ranks its mean
    lo, hi = rank_bounds(sim, gt)
    per_query = [bf_tie_break_ranks(row, int(k)) for row, k in zip(sim.tolist(), gt)]
    assert lo.tolist() == [min(r) for r in per_query] and hi.tolist() == [max(r) for r in per_query]
    assert gt_ranks(sim, gt, ties="expected").tolist() == pytest.approx([statistics.mean(r) for r in per_query])


def test_expected_multi_caption_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(11)
    n_text, n_video = 9, 5
    t2v = torch.cat([torch.arange(n_video), torch.randint(0, n_video, (n_text - n_video,), generator=g)])
    sim = torch.randint(0, 3, (n_text, n_video), generator=g).float()
    rows = sim.tolist()
    per_video = []
    for v in range(n_video):
        groups = [max(rows[c][v] for c in range(n_text) if int(t2v[c]) == u) for u in range(n_video)]
        per_video.append(bf_tie_break_ranks(groups, v))
    assert_metrics_equal(v2t_metrics_multi(sim, t2v, ties="expected"), bf_expected_metrics(per_video))
    lo, hi = v2t_multi_rank_bounds(sim, t2v)
    assert lo.tolist() == [min(r) for r in per_video] and hi.tolist() == [max(r) for r in per_video]
    per_text = [bf_tie_break_ranks(row, int(k)) for row, k in zip(rows, t2v)]
    assert_metrics_equal(t2v_metrics(sim, t2v, ties="expected"), bf_expected_metrics(per_text))


def test_tie_tolerance_catches_rounding_level_differences() -> None:
    g = torch.Generator().manual_seed(4)
    base = torch.rand(6, 6, generator=g)
    noisy = base + 1e-6 * torch.randn(6, 6, generator=g)  # e.g. the same mean taken in another order
    twin = torch.cat([noisy, base[:, :1] + 1e-6 * torch.randn(6, 1, generator=g)], dim=1)  # col 6 ~ col 0
    gt = torch.arange(6)
    rows = twin.tolist()
    ref = bf_expected_metrics([bf_tie_break_ranks(row, k, tol=1e-4) for row, k in zip(rows, range(6))])
    assert_metrics_equal(retrieval_metrics(twin, gt, ties="expected", tie_tol=1e-4), ref)
    assert ref["tied_queries"] >= 1
    # without a tolerance the rounding noise decides, and no tie is seen
    assert retrieval_metrics(twin, gt, ties="expected")["tied_queries"] == 0
    with pytest.raises(ValueError, match="tie_tol"):
        retrieval_metrics(twin, gt, tie_tol=-1.0)


def test_expected_ties_log_nothing_at_warning_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="vidret.eval.metrics"):
        retrieval_metrics(torch.ones(4, 4), ties="expected")
    assert caplog.text == ""


def test_metrics_from_rank_bounds_validates() -> None:
    with pytest.raises(ValueError, match="pessimistic >= optimistic"):
        metrics_from_rank_bounds(torch.tensor([2, 1]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="same shape"):
        metrics_from_rank_bounds(torch.tensor([1, 1]), torch.tensor([1]))
