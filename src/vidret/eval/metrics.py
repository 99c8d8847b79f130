"""Retrieval metrics: pure functions of a similarity matrix (no I/O, CPU or GPU tensors).

Conventions (METHODS.md, "Metrics"):

* ``sim`` is ``[N_query, N_item]``; a larger score means a better match. ``gt[i]`` is the index of
  query ``i``'s ground-truth item; ``gt=None`` means the diagonal (``N_query == N_item``).
* Ranks are **1-indexed** (the MV-Adapter code reports 0-indexed ranks; we do not).
* Ties: ``ties="optimistic"`` (the default) gives ``rank = 1 + #(items scoring strictly higher than
  the ground truth)``, i.e. the ground truth wins every tie. This is what CLIP4Clip-style evaluation
  code does in effect (it locates the ground-truth score in the sorted row and takes the first
  match), so the default numbers are comparable with the papers. ``ties="pessimistic"`` gives
  ``rank = #(items scoring >= the ground truth)`` (the ground truth loses every tie); a gap between
  the two reveals a degenerate model (a collapsed embedding ties everything and is perfect under the
  optimistic rule), and a warning is logged whenever a ground truth is tied. ``ties="expected"`` is the
  honest middle: the ground truth's position under a uniformly random tie-break. Its rank is the
  expected position ``(optimistic + pessimistic) / 2`` (a float), and R@K is the expected recall, the
  mean over queries of ``P(rank <= K)`` (see :func:`metrics_from_rank_bounds`). An order-blind model
  tying a clip with its time-reversed twin thus gets 1/2 of a hit at R@1, not a whole one.
* ``tie_tol`` (default 0: exact equality) widens a tie to scores within ``tie_tol`` of the ground
  truth's: two mathematically equal scores computed in a different order (a mean over frames taken
  in reverse) can differ in the last bits, which would otherwise break the tie at random.
* R@K is the percentage of queries with rank <= K; MdR is the median rank (the mean of the two middle
  ranks for an even count, as ``numpy.median``); MnR the mean rank.
* NaN anywhere in a similarity matrix raises :class:`SimilarityError` (a ``ValueError``): NaN
  compares false against everything and would silently count as a perfect rank.

Large sets are processed in row chunks: the ground-truth score of each query is gathered first
(``N_query`` values), then the entries beating it are counted a chunk of rows at a time, so the extra
memory is a few bytes per element of one chunk (default about 4M elements; some 35 MB measured on a
20k x 20k float32 matrix), never a second ``N x N`` matrix.

Multi-caption sets (MSVD, VATEX) use :func:`t2v_metrics` (every caption is a query) and
:func:`v2t_metrics_multi` (each video's caption group is scored by its best caption). Post-processing
(:func:`dual_softmax`, :func:`qb_norm`) returns a new matrix to feed to the same metric functions;
its results are reported separately, never mixed into the default numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from vidret.errors import VidretError

logger = logging.getLogger(__name__)

Ties = Literal["optimistic", "pessimistic", "expected"]
METRIC_KEYS: tuple[str, ...] = ("R1", "R5", "R10", "MdR", "MnR")
_RECALL_KS: tuple[int, ...] = (1, 5, 10)
# Elements per chunk when chunk_size is not given: a 4 MiB boolean mask per comparison.
_CHUNK_ELEMENTS = 1 << 22


class SimilarityError(VidretError, ValueError):
    """An invalid similarity matrix or ground truth (NaN scores, wrong shape, index out of range).

    Both a ``VidretError`` (the CLI prints its message) and a ``ValueError`` (it is a bad argument).
    """


# --------------------------------------------------------------------------- validation helpers


def _check_sim(sim: Tensor, name: str = "sim") -> None:
    if not isinstance(sim, Tensor):
        raise SimilarityError(f"{name} must be a torch.Tensor, got {type(sim).__name__}")
    if sim.dim() != 2:
        raise SimilarityError(f"{name} must be 2-D [N_query, N_item], got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise SimilarityError(f"{name} must have at least one query and one item, got {tuple(sim.shape)}")
    if sim.dtype == torch.bool or sim.is_complex():
        raise SimilarityError(f"{name} must hold real scores (float or int), got dtype {sim.dtype}")


def _check_no_nan(block: Tensor, name: str) -> None:
    if block.is_floating_point() and bool(torch.isnan(block).any()):
        raise SimilarityError(
            f"{name} contains NaN scores; the model produced non-finite features "
            "(check for a diverged run or an fp16 overflow) and ranks would be meaningless"
        )


def _check_index(gt: Tensor, n_query: int, n_item: int, device: torch.device, name: str) -> Tensor:
    if not isinstance(gt, Tensor):
        raise SimilarityError(f"{name} must be a torch.Tensor of item indices, got {type(gt).__name__}")
    if gt.dtype.is_floating_point or gt.dtype == torch.bool or gt.is_complex():
        raise SimilarityError(f"{name} must hold integer item indices, got dtype {gt.dtype}")
    if gt.dim() != 1 or gt.shape[0] != n_query:
        raise SimilarityError(f"{name} must have shape [{n_query}] (one item per query), got {tuple(gt.shape)}")
    gt = gt.to(device=device, dtype=torch.long)
    lo, hi = int(gt.min()), int(gt.max())
    if lo < 0 or hi >= n_item:
        raise SimilarityError(f"{name} holds indices in [{lo}, {hi}], outside [0, {n_item - 1}]")
    return gt


def _check_ties(ties: str, tie_tol: float = 0.0) -> None:
    if ties not in ("optimistic", "pessimistic", "expected"):
        raise SimilarityError(f"ties must be 'optimistic', 'pessimistic' or 'expected', got {ties!r}")
    if isinstance(tie_tol, bool) or not isinstance(tie_tol, (int, float)) or not 0 <= tie_tol < math.inf:
        raise SimilarityError(f"tie_tol must be a finite number >= 0, got {tie_tol!r}")


def _rows_per_chunk(n_cols: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, n_cols))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SimilarityError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Float dtype for derived scores: at least float32, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float64


def _count_bounds(block: Tensor, target: Tensor, tie_tol: float) -> tuple[Tensor, Tensor]:
    """(optimistic, pessimistic) ranks of ``target`` ([r, 1]) within each row of ``block`` ([r, M])."""
    if tie_tol == 0:
        greater = (block > target).sum(dim=1)  # items strictly above the ground truth
        at_least = (block >= target).sum(dim=1)  # the same plus every tie, the ground truth included
    else:
        greater = (block > target + tie_tol).sum(dim=1)
        at_least = (block >= target - tie_tol).sum(dim=1)
    return greater + 1, at_least


def _pick_rank(optimistic: Tensor, pessimistic: Tensor, ties: Ties) -> Tensor:
    if ties == "optimistic":
        return optimistic
    if ties == "pessimistic":
        return pessimistic
    return (optimistic + pessimistic).to(torch.float64) / 2  # the expected position under a random tie-break


def _log_ties(n_tied: int, n_query: int, ties: Ties) -> None:
    if n_tied:
        # "expected" already accounts for ties; the other rules pick a side, which deserves a warning
        logger.log(
            logging.DEBUG if ties == "expected" else logging.WARNING,
            "%d of %d queries tie their ground-truth score with another item; ranks use ties=%r",
            n_tied,
            n_query,
            ties,
        )


# --------------------------------------------------------------------------- ranks and metrics


def gt_ranks(
    sim: Tensor,
    gt: Tensor | None = None,
    *,
    ties: Ties = "optimistic",
    tie_tol: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """1-indexed rank of each query's ground-truth item, computed in row chunks.

    Args:
        sim: Scores ``[N_query, N_item]`` (any real dtype, any device; views such as ``sim.T`` are fine).
        gt: ``[N_query]`` ground-truth item index per query; ``None`` means the diagonal.
        ties: ``"optimistic"``: ``1 + #(strictly greater)``; ``"pessimistic"``: ``#(greater or equal)``;
            ``"expected"``: their mean, the expected position under a random tie-break (float64).
        tie_tol: Scores within this distance of the ground truth's count as tied (0: exact ties only).
        chunk_size: Query rows per chunk; ``None`` picks about 4M elements per chunk.

    Returns:
        ``[N_query]`` ranks on ``sim``'s device, each in ``[1, N_item]``: int64, or float64 for ``"expected"``.

    Raises:
        SimilarityError: NaN scores, a bad shape or an out-of-range ``gt``.
    """
    _check_ties(ties, tie_tol)
    optimistic, pessimistic = _rank_bounds(sim, gt, tie_tol, chunk_size)
    _log_ties(int((pessimistic > optimistic).sum()), sim.shape[0], ties)
    return _pick_rank(optimistic, pessimistic, ties)


def rank_bounds(
    sim: Tensor, gt: Tensor | None = None, *, tie_tol: float = 0.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(optimistic, pessimistic) 1-indexed ranks of each query's ground truth; logs nothing.

    The ground truth wins every tie in the first and loses every tie in the second; they differ exactly for
    the queries whose ground truth is tied, and under a random tie-break the rank is uniform between them.
    Feed both to :func:`metrics_from_rank_bounds` for tie-aware (expected) metrics.

    Args:
        sim: Scores ``[N_query, N_item]``.
        gt: ``[N_query]`` ground-truth item per query; ``None`` means the diagonal.
        tie_tol: Scores within this distance of the ground truth's count as tied (0: exact ties only).
        chunk_size: Query rows per chunk.

    Returns:
        Two ``[N_query]`` int64 tensors on ``sim``'s device.
    """
    _check_ties("optimistic", tie_tol)
    return _rank_bounds(sim, gt, tie_tol, chunk_size)


def _rank_bounds(sim: Tensor, gt: Tensor | None, tie_tol: float, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    _check_sim(sim)
    n_query, n_item = sim.shape
    rows = _rows_per_chunk(n_item, chunk_size)
    if gt is None:
        if n_query != n_item:
            raise SimilarityError(
                f"gt=None means the diagonal, which needs a square matrix; got {n_query} queries x "
                f"{n_item} items: pass gt (the ground-truth item index of every query)"
            )
        gt_score = sim.diagonal()  # [N_query], a view
    else:
        gt_idx = _check_index(gt, n_query, n_item, sim.device, "gt")
        gt_score = sim.gather(1, gt_idx[:, None]).squeeze(1)  # [N_query, 1] -> [N_query]
    optimistic = torch.empty(n_query, dtype=torch.long, device=sim.device)
    pessimistic = torch.empty(n_query, dtype=torch.long, device=sim.device)
    for start in range(0, n_query, rows):
        block = sim[start : start + rows]  # [r, N_item], a view
        _check_no_nan(block, "sim")
        lo, hi = _count_bounds(block, gt_score[start : start + rows, None], tie_tol)
        optimistic[start : start + rows] = lo
        pessimistic[start : start + rows] = hi
    return optimistic, pessimistic


def metrics_from_ranks(ranks: Tensor) -> dict[str, float]:
    """R@1/5/10 (percent), MdR and MnR from 1-indexed ranks, plus ``n_queries``.

    Args:
        ranks: ``[N_query]`` 1-indexed ranks (as from :func:`gt_ranks`).

    Returns:
        ``{"R1", "R5", "R10", "MdR", "MnR", "n_queries"}``; MdR averages the two middle ranks when
        ``N_query`` is even (``numpy.median``, not ``torch.median``'s lower middle).
    """
    if not isinstance(ranks, Tensor) or ranks.dim() != 1 or ranks.numel() == 0:
        raise SimilarityError("ranks must be a non-empty 1-D tensor")
    r = ranks.detach().to(device="cpu", dtype=torch.float64)
    if bool((r < 1).any()):
        raise SimilarityError("ranks are 1-indexed: every rank must be >= 1")
    n = r.numel()
    out: dict[str, float] = {f"R{k}": 100.0 * float((r <= k).sum()) / n for k in _RECALL_KS}
    ordered = r.sort().values
    out["MdR"] = float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)
    out["MnR"] = float(r.mean())
    out["n_queries"] = n
    return out


def metrics_from_rank_bounds(optimistic: Tensor, pessimistic: Tensor) -> dict[str, float]:
    """Tie-aware metrics: the expectation under a uniformly random tie-break.

    A query whose ground truth ties with ``k`` other items has its rank uniform on ``[lo, hi]``
    (``lo`` = optimistic, ``hi = lo + k`` = pessimistic), so it counts ``P(rank <= K) =
    clip((K - lo + 1) / (hi - lo + 1), 0, 1)`` towards R@K (exactly the mean over every tie-break order).
    MdR and MnR are the median and mean of the expected ranks ``(lo + hi) / 2`` (for MnR that is also the
    expected mean rank). With no ties this equals :func:`metrics_from_ranks`.

    Args:
        optimistic: ``[N_query]`` 1-indexed ranks with every tie won (as from :func:`rank_bounds`).
        pessimistic: ``[N_query]`` ranks with every tie lost; ``>= optimistic`` elementwise.

    Returns:
        ``{"R1", "R5", "R10", "MdR", "MnR", "n_queries", "tied_queries"}``.
    """
    if not isinstance(optimistic, Tensor) or not isinstance(pessimistic, Tensor):
        raise SimilarityError("optimistic and pessimistic must be tensors of ranks")
    lo = optimistic.detach().to(device="cpu", dtype=torch.float64)
    hi = pessimistic.detach().to(device="cpu", dtype=torch.float64)
    if lo.dim() != 1 or lo.numel() == 0 or lo.shape != hi.shape:
        raise SimilarityError("optimistic and pessimistic must be non-empty 1-D tensors of the same shape")
    if bool((lo < 1).any()) or bool((hi < lo).any()):
        raise SimilarityError("ranks are 1-indexed and pessimistic >= optimistic elementwise")
    n = lo.numel()
    width = hi - lo + 1
    out: dict[str, float] = {
        f"R{k}": 100.0 * float(((k - lo + 1) / width).clamp(0.0, 1.0).sum()) / n for k in _RECALL_KS
    }
    mid = metrics_from_ranks((lo + hi) / 2)
    out["MdR"], out["MnR"], out["n_queries"] = mid["MdR"], mid["MnR"], n
    out["tied_queries"] = int((hi > lo).sum())
    return out


def _metrics(optimistic: Tensor, pessimistic: Tensor, ties: Ties) -> dict[str, float]:
    if ties == "expected":
        return metrics_from_rank_bounds(optimistic, pessimistic)
    return metrics_from_ranks(_pick_rank(optimistic, pessimistic, ties))


def retrieval_metrics(
    sim: Tensor,
    gt: Tensor | None = None,
    *,
    ties: Ties = "optimistic",
    tie_tol: float = 0.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """R@1, R@5, R@10 (percent), MdR, MnR (1-indexed ranks) and ``n_queries`` of one direction.

    For text-to-video pass ``sim`` ``[N_text, N_video]``; for video-to-text pass ``sim.T`` (no copy).

    Args:
        sim: Scores ``[N_query, N_item]``.
        gt: ``[N_query]`` ground-truth item per query; ``None`` means the diagonal (square ``sim``).
        ties: Tie policy, see :func:`gt_ranks` (default ``"optimistic"``: ``1 + #strictly greater``);
            ``"expected"`` gives the expected metrics under a random tie-break (:func:`metrics_from_rank_bounds`).
        tie_tol: Scores within this distance of the ground truth's count as tied (0: exact ties only).
        chunk_size: Query rows per chunk (memory bound); ``None`` chooses one.

    Returns:
        ``{"R1", "R5", "R10", "MdR", "MnR", "n_queries"}`` (plus ``"tied_queries"`` for ``"expected"``).
    """
    _check_ties(ties, tie_tol)
    optimistic, pessimistic = _rank_bounds(sim, gt, tie_tol, chunk_size)
    _log_ties(int((pessimistic > optimistic).sum()), sim.shape[0], ties)
    return _metrics(optimistic, pessimistic, ties)


def t2v_metrics(
    sim_text_video: Tensor,
    text_to_video: Tensor,
    *,
    ties: Ties = "optimistic",
    tie_tol: float = 0.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Text-to-video metrics for a multi-caption set: every caption is a query.

    Args:
        sim_text_video: Scores ``[N_text, N_video]``.
        text_to_video: ``[N_text]`` index of the video each caption describes.
        ties: Tie policy, see :func:`gt_ranks`.
        tie_tol: Scores within this distance of the ground truth's count as tied.
        chunk_size: Caption rows per chunk.
    """
    return retrieval_metrics(sim_text_video, text_to_video, ties=ties, tie_tol=tie_tol, chunk_size=chunk_size)


def v2t_multi_ranks(
    sim_text_video: Tensor,
    text_to_video: Tensor,
    *,
    ties: Ties = "optimistic",
    tie_tol: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """1-indexed video-to-text ranks when each video owns a group of captions.

    For query video ``v`` and caption group ``g`` (the captions of video ``g``), the group score is
    ``max over captions c with text_to_video[c] == g of sim_text_video[c, v]``; the rank of ``v`` is
    the rank of its own group ``g == v`` among all ``N_video`` groups, with the tie policy of
    :func:`gt_ranks`. With one caption per video this equals ``gt_ranks`` on ``sim.T``.

    Args:
        sim_text_video: Scores ``[N_text, N_video]``.
        text_to_video: ``[N_text]`` video index of each caption; every video needs >= 1 caption.
        ties: Tie policy (``"expected"`` gives float64 expected ranks).
        tie_tol: Group scores within this distance of the own group's count as tied.
        chunk_size: Query videos per chunk; ``None`` picks about 4M scores per chunk.

    Returns:
        ``[N_video]`` ranks in ``[1, N_video]``: int64, or float64 for ``"expected"``.
    """
    _check_ties(ties, tie_tol)
    optimistic, pessimistic = v2t_multi_rank_bounds(
        sim_text_video, text_to_video, tie_tol=tie_tol, chunk_size=chunk_size
    )
    _log_ties(int((pessimistic > optimistic).sum()), sim_text_video.shape[1], ties)
    return _pick_rank(optimistic, pessimistic, ties)


def v2t_multi_rank_bounds(
    sim_text_video: Tensor, text_to_video: Tensor, *, tie_tol: float = 0.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """(optimistic, pessimistic) video-to-text ranks of caption groups (see :func:`v2t_multi_ranks`); logs nothing."""
    _check_sim(sim_text_video, "sim_text_video")
    _check_ties("optimistic", tie_tol)
    n_text, n_video = sim_text_video.shape
    device = sim_text_video.device
    t2v = _check_index(text_to_video, n_text, n_video, device, "text_to_video")
    counts = torch.bincount(t2v, minlength=n_video)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise SimilarityError(
            f"{int((counts == 0).sum())} video(s) have no caption (e.g. indices {missing}); V2T needs "
            "every video's own caption group: drop caption-less videos from the evaluation set"
        )
    work = sim_text_video.dtype if sim_text_video.is_floating_point() else torch.float64
    rows = _rows_per_chunk(n_text + n_video, chunk_size)  # a chunk holds [r, N_text] and [r, N_video]
    sim_vt = sim_text_video.T  # [N_text, N_video] -> [N_video, N_text], a view
    optimistic = torch.empty(n_video, dtype=torch.long, device=device)
    pessimistic = torch.empty(n_video, dtype=torch.long, device=device)
    for start in range(0, n_video, rows):
        block = sim_vt[start : start + rows]  # [r, N_text]
        _check_no_nan(block, "sim_text_video")
        r = block.shape[0]
        # [r, N_text] -> [r, N_video]: each group's best caption (every group is non-empty)
        group = torch.full((r, n_video), -math.inf, dtype=work, device=device)
        group.scatter_reduce_(1, t2v.expand(r, n_text), block.to(work), reduce="amax", include_self=True)
        own = torch.arange(start, start + r, device=device)
        target = group.gather(1, own[:, None])  # [r, 1]
        lo, hi = _count_bounds(group, target, tie_tol)
        optimistic[start : start + r] = lo
        pessimistic[start : start + r] = hi
    return optimistic, pessimistic


def v2t_metrics_multi(
    sim_text_video: Tensor,
    text_to_video: Tensor,
    *,
    ties: Ties = "optimistic",
    tie_tol: float = 0.0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Video-to-text metrics for a multi-caption set (MSVD, VATEX); see :func:`v2t_multi_ranks`.

    Each video's caption group is scored by its best caption and the query video's own group is
    ranked among all groups, so there is one query per video.

    Args:
        sim_text_video: Scores ``[N_text, N_video]`` (text rows, as for T2V).
        text_to_video: ``[N_text]`` video index of each caption.
        ties: Tie policy (``"expected"``: expected metrics under a random tie-break).
        tie_tol: Group scores within this distance of the own group's count as tied.
        chunk_size: Query videos per chunk.
    """
    _check_ties(ties, tie_tol)
    lo, hi = v2t_multi_rank_bounds(sim_text_video, text_to_video, tie_tol=tie_tol, chunk_size=chunk_size)
    _log_ties(int((hi > lo).sum()), sim_text_video.shape[1], ties)
    return _metrics(lo, hi, ties)


# --------------------------------------------------------------------------- post-processing


def dual_softmax(sim: Tensor, *, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Dual softmax (DSL) inference re-scoring, as in CAMoE (Cheng et al. 2021) and its followers.

    ``out[i, j] = sim[i, j] * softmax_i(sim[:, j] / temperature)``: each score is weighted by how
    strongly the item prefers this query over the other queries (a softmax over the QUERY axis,
    dim 0), which down-weights "hub" items that match every query. Orient ``sim`` as
    ``[N_query, N_item]``: for T2V pass ``sim_text_video``; for V2T pass ``sim_text_video.T`` (prior
    over videos). The reference code also multiplies by ``N_query``, a positive constant that changes
    no ranking, so it is left out. DSL uses the whole test query set as a prior (transductive): report
    its numbers separately.

    Args:
        sim: Scores ``[N_query, N_item]``. ``temperature=1`` assumes CLIP logits (the logit scale,
            about 100, already applied, as ``model.similarity`` returns); for raw cosine similarities
            use ``temperature=0.01``.
        temperature: Softmax temperature (> 0).
        chunk_size: Rows per chunk for the column log-sum-exp.

    Returns:
        ``[N_query, N_item]`` re-scored matrix (float32, or float64 for float64 input).
    """
    _check_sim(sim)
    if not temperature > 0 or not math.isfinite(temperature):
        raise SimilarityError(f"temperature must be a positive finite number, got {temperature!r}")
    n_query, n_item = sim.shape
    work = _work_dtype(sim.dtype)
    rows = _rows_per_chunk(n_item, chunk_size)
    lse = torch.full((n_item,), -math.inf, dtype=work, device=sim.device)  # log sum_i exp(sim[i, j] / T)
    for start in range(0, n_query, rows):
        block = sim[start : start + rows]
        _check_no_nan(block, "sim")
        lse = torch.logaddexp(lse, torch.logsumexp(block.to(work) / temperature, dim=0))
    out = torch.empty((n_query, n_item), dtype=work, device=sim.device)
    for start in range(0, n_query, rows):
        block = sim[start : start + rows].to(work)
        out[start : start + rows] = block * torch.exp(block / temperature - lse)
    return out


def qb_norm(
    sim: Tensor,
    query_bank_sim: Tensor,
    *,
    k: int = 1,
    beta: float = 20.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Querybank Normalisation with the Dynamic Inverted Softmax (Bogolin et al., CVPR 2022).

    What is computed, following the authors' ``dynamic_inverted_softmax.py``:

    1. Activation set ``A``: items that some querybank query ranks in its top ``k``
       (``rank <= k`` with the optimistic tie rule, so items tied with a bank query's k-th score count).
    2. A test query is normalised only if its top-1 item is in ``A`` (with tied maxima: if any of
       them is in ``A``). Its row becomes ``beta * sim[q, j] - log sum_b exp(beta * bank[b, j])``,
       the logarithm of the paper's inverted softmax ``exp(beta s_qj) / sum_b exp(beta s_bj)``: the
       same ranking, computed without overflow for large ``beta * s``.
    3. Other rows are returned unchanged.

    Rows of the output are therefore on different scales: rank items within a row (per query) only.
    ``beta`` assumes cosine similarities (the paper uses 20); divide logits by the logit scale first.

    Args:
        sim: Test scores ``[N_query, N_item]`` (e.g. test texts x test videos for T2V).
        query_bank_sim: Querybank scores ``[N_bank, N_item]`` against the same items (e.g. training
            captions x test videos).
        k: Top-k of each bank query that forms the activation set (>= 1).
        beta: Inverse temperature of the inverted softmax (> 0).
        chunk_size: Rows per chunk.

    Returns:
        ``[N_query, N_item]`` re-scored matrix (float32, or float64 for float64 input).
    """
    _check_sim(sim)
    _check_sim(query_bank_sim, "query_bank_sim")
    n_query, n_item = sim.shape
    n_bank = query_bank_sim.shape[0]
    if query_bank_sim.shape[1] != n_item:
        raise SimilarityError(
            f"query_bank_sim scores {query_bank_sim.shape[1]} items but sim scores {n_item}: both must be "
            "computed against the same item set"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_item:
        raise SimilarityError(f"k must be an int in [1, {n_item}], got {k!r}")
    if not beta > 0 or not math.isfinite(beta):
        raise SimilarityError(f"beta must be a positive finite number, got {beta!r}")
    work = _work_dtype(torch.promote_types(sim.dtype, query_bank_sim.dtype))
    bank = query_bank_sim.to(sim.device)
    rows = _rows_per_chunk(n_item, chunk_size)
    lse = torch.full((n_item,), -math.inf, dtype=work, device=sim.device)  # log sum_b exp(beta bank[b, j])
    active = torch.zeros(n_item, dtype=torch.bool, device=sim.device)
    for start in range(0, n_bank, rows):
        block = bank[start : start + rows].to(work)  # [r, N_item]
        _check_no_nan(block, "query_bank_sim")
        lse = torch.logaddexp(lse, torch.logsumexp(beta * block, dim=0))
        kth = block.topk(k, dim=1).values[:, -1:]  # [r, 1], the k-th best score of each bank query
        active |= (block >= kth).any(dim=0)
    out = torch.empty((n_query, n_item), dtype=work, device=sim.device)
    n_normalised = 0
    for start in range(0, n_query, rows):
        block = sim[start : start + rows].to(work)
        _check_no_nan(block, "sim")
        top1 = block == block.max(dim=1, keepdim=True).values  # [r, N_item]
        normalise = (top1 & active).any(dim=1, keepdim=True)  # [r, 1]
        out[start : start + rows] = torch.where(normalise, beta * block - lse, block)
        n_normalised += int(normalise.sum())
    logger.debug("qb_norm: %d of %d queries normalised (|A| = %d items)", n_normalised, n_query, int(active.sum()))
    return out


def format_metrics(d: Mapping[str, float]) -> str:
    """One-line summary, e.g. ``"R@1 45.2 R@5 71.0 R@10 80.3 MdR 2.0 MnR 14.1"``.

    Args:
        d: A dict from :func:`retrieval_metrics` (needs ``R1, R5, R10, MdR, MnR``).
    """
    missing = [key for key in METRIC_KEYS if key not in d]
    if missing:
        raise SimilarityError(f"format_metrics needs keys {list(METRIC_KEYS)}; missing {missing}")
    return f"R@1 {d['R1']:.1f} R@5 {d['R5']:.1f} R@10 {d['R10']:.1f} MdR {d['MdR']:.1f} MnR {d['MnR']:.1f}"
