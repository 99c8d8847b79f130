"""Evaluation: encode a manifest's videos and captions, score every pair, report T2V and V2T metrics.

Protocols (METHODS.md): ``single`` (one caption per video, both directions on the square matrix), ``multi``
(every caption is a T2V query; V2T ranks caption groups by their best caption) and ``paragraph`` (a video's
captions joined into one query). DSL and QB-Norm are reported separately under ``postprocessed``; the default
numbers never include them.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vidret.adapters.base import backbone_state_dict
from vidret.backbone.clip import fingerprint
from vidret.backbone.tokenizer import tokenize
from vidret.data.cache import FrameCache
from vidret.data.dataset import EvalVideoDataset, collate
from vidret.data.decode import BadVideoReport
from vidret.data.manifest import ManifestEntry, read_manifest
from vidret.errors import VidretError
from vidret.eval import metrics as M
from vidret.heads import VideoFeatures
from vidret.model import VideoTextModel
from vidret.procs import dataloader_worker_init

# The evaluation settings an adapter records (adapters/io.py EVAL_SETTINGS) that a flag may override:
# settings key -> (flag, the word after the recorded value in the notice)
EVAL_FLAGS: dict[str, tuple[str, str]] = {
    "num_frames": ("--frames", "frames"),
    "max_words": ("--max-words", "words"),
    "sampling": ("--sampling", "sampling"),
    "protocol": ("--protocol", "protocol"),
}


def settings_for_adapter(
    recorded: Mapping[str, Any], given: Mapping[str, Any], defaults: Mapping[str, Any]
) -> tuple[dict[str, Any], list[str]]:
    """Each setting from the user's flag, else the adapter's recorded value, else the default.

    Args:
        recorded: the adapter's recorded settings (``vidret.adapters.io.recorded_eval_settings``; {} for
            adapters saved before they were recorded, which therefore keep the defaults).
        given: the user's flag values by settings key (None: not given).
        defaults: a value for every setting the caller needs; the result has exactly these keys.

    Returns:
        (settings, notices): one ``note: --frames 12 overrides the adapter's 8 frames`` line per flag whose value
        differs from the recorded one, for the caller to print on stderr.
    """
    settings: dict[str, Any] = {}
    notices: list[str] = []
    for key, default in defaults.items():
        value = given.get(key)
        if value is None:
            settings[key] = recorded.get(key, default)
            continue
        settings[key] = value
        if key in recorded and recorded[key] != value:
            flag, word = EVAL_FLAGS.get(key, (f"--{key.replace('_', '-')}", key))
            notices.append(f"note: {flag} {value} overrides the adapter's {recorded[key]} {word}")
    return settings, notices


def captions_for(entries: list[ManifestEntry], protocol: str) -> tuple[list[str], list[int]]:
    """Query texts and the index of each query's video, for a protocol."""
    texts: list[str] = []
    owner: list[int] = []
    for i, e in enumerate(entries):
        if not e.captions:
            continue
        if protocol == "paragraph":
            texts.append(" ".join(c.strip() for c in e.captions))
            owner.append(i)
        elif protocol == "single":
            texts.append(e.captions[0])
            owner.append(i)
        elif protocol == "multi":
            texts.extend(e.captions)
            owner.extend([i] * len(e.captions))
        else:
            raise ValueError(f"unknown protocol {protocol!r}")
    return texts, owner


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@torch.no_grad()
def encode_texts(
    model: VideoTextModel,
    texts: list[str],
    max_words: int,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
) -> Tensor:
    """[N] captions -> [N, E] fp32 text embeddings."""
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenize(texts[i : i + batch_size], context_length=max_words).to(device)
        with _autocast(device, precision):
            out.append(model.encode_text(tokens).float())
    return torch.cat(out) if out else torch.zeros(0, model.clip.config.embed_dim)


@torch.no_grad()
def encode_videos(
    model: VideoTextModel,
    entries: list[ManifestEntry],
    data_cfg: Any,
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 32,
) -> tuple[VideoFeatures, list[bool], list[str]]:
    """Encode every video; returns per-frame features [N, T, E], which videos decoded, and the bad ones' ids.

    Frames follow the data config's evaluation rule (``data.eval_sampling``), as the recipe trained.
    """
    sampling = data_cfg.sampling("eval")
    cache = FrameCache(data_cfg.cache_dir, sampling, data_cfg.image_size) if data_cfg.cache_dir else None
    ds = EvalVideoDataset(entries, sampling, cache=cache, image_size=data_cfg.image_size)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        num_workers=data_cfg.num_workers,
        worker_init_fn=dataloader_worker_init(),  # workers die with this process, even on kill -9
    )
    T, E = data_cfg.num_frames, model.clip.config.embed_dim
    frames = torch.zeros(len(entries), T, E)
    masks = torch.zeros(len(entries), T, dtype=torch.bool)
    valid = [False] * len(entries)
    bad = BadVideoReport(total=len(entries))
    for batch in loader:
        bad.update(batch)
        if batch["frames"].shape[0] == 0:
            continue
        with _autocast(device, precision):
            v = model.encode_video(batch["frames"].to(device), batch["frame_mask"].to(device))
        idx = batch["video_index"]
        frames[idx] = v.frames.float().cpu()
        masks[idx] = v.mask.cpu()
        for i in idx.tolist():
            valid[i] = True
    bad.check(data_cfg.max_bad_fraction)
    return VideoFeatures(frames, masks), valid, [v for v, _, _ in bad.items]


@torch.no_grad()
def similarity_matrix(model: VideoTextModel, text: Tensor, video: VideoFeatures, chunk: int = 4096) -> Tensor:
    """[N_text, N_video] logits, computed in video chunks so large sets fit in memory."""
    cols = []
    for s in range(0, video.frames.shape[0], chunk):
        part = VideoFeatures(video.frames[s : s + chunk], video.mask[s : s + chunk])
        cols.append(model.similarity(text, part).float().cpu())
    return torch.cat(cols, dim=1)


def metrics_for(sim: Tensor, owner: Tensor, protocol: str) -> dict[str, dict[str, float]]:
    """T2V and V2T metrics of a [N_text, N_video] matrix under a protocol."""
    t2v = M.retrieval_metrics(sim, owner)
    if protocol == "multi":
        v2t = M.v2t_metrics_multi(sim, owner)
    else:
        # one query per video: the transposed matrix with the inverse assignment
        v2t = M.retrieval_metrics(sim.t(), torch.argsort(owner))
    return {"t2v": t2v, "v2t": v2t}


def pair_accuracy(
    sim: Tensor, owner: list[int], entries: list[ManifestEntry], pairs: list[tuple[str, str]], tie_tol: float = 1e-3
) -> dict[str, float]:
    """Time-reversal hard negatives: how often a caption's own video outscores its reversed twin.

    A win counts 1, a tie (logits within ``tie_tol``, e.g. an order-blind model seeing the same frames in another
    order, up to float rounding) counts 1/2, so chance and order-blindness both give 50%.
    """
    index = {e.video_id: i for i, e in enumerate(entries)}
    caps_of: dict[int, list[int]] = {}
    for q, v in enumerate(owner):
        caps_of.setdefault(v, []).append(q)
    wins = ties = total = 0
    for a, b in pairs:
        if a not in index or b not in index:
            continue
        ia, ib = index[a], index[b]
        for own, other in ((ia, ib), (ib, ia)):
            for q in caps_of.get(own, []):
                total += 1
                margin = float(sim[q, own] - sim[q, other])
                if abs(margin) <= tie_tol:
                    ties += 1
                elif margin > 0:
                    wins += 1
    if not total:
        return {"pair_accuracy": float("nan"), "pair_ties": float("nan"), "pair_queries": 0}
    return {
        "pair_accuracy": 100.0 * (wins + 0.5 * ties) / total,
        "pair_ties": 100.0 * ties / total,
        "pair_queries": total,
    }


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """Hard-negative pairs file: ``{"pairs": [{"forward": id, "reversed": id}, ...]}`` (pocket ``test_pairs.json``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        return [(str(x["forward"]), str(x["reversed"])) for x in doc["pairs"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise VidretError(
            f"{p}: not a pairs file ({e}); expected {{'pairs': [{{'forward': id, 'reversed': id}}]}}"
        ) from e


def evaluate_model(
    model: VideoTextModel,
    manifest: str | Path,
    data_cfg: Any,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 32,
    protocol: str | None = None,
    pairs_file: str | Path | None = None,
    postprocess: bool = True,
    extra: dict[str, Any] | None = None,
    query_bank: str | Path | None = None,
    query_bank_size: int | None = None,
    qb_k: int = 1,
    qb_beta: float = 20.0,
) -> dict[str, Any]:
    """Evaluate ``model`` on a manifest; returns a JSON-ready dict (metrics, counts, fingerprints).

    ``query_bank``: a manifest (normally the TRAINING split) whose captions form QB-Norm's querybank; the T2V
    metrics re-scored with the dynamic inverted softmax are reported under ``postprocessed.qbnorm`` (see
    :func:`vidret.eval.metrics.qb_norm`; ``query_bank_size`` draws that many captions, seeded, to bound the
    cost). The plain metrics are always the headline numbers.
    """
    device = torch.device(device)
    protocol = protocol or data_cfg.test_protocol
    entries = read_manifest(manifest)
    model.eval()
    video, valid, bad = encode_videos(model, entries, data_cfg, device, precision, batch_size)
    keep = [i for i, ok in enumerate(valid) if ok]
    entries_kept = [entries[i] for i in keep]
    video = VideoFeatures(video.frames[keep], video.mask[keep])
    texts, owner = captions_for(entries_kept, protocol)
    text = encode_texts(model, texts, data_cfg.max_words, device, precision)
    video_dev = VideoFeatures(video.frames.to(device), video.mask.to(device))
    sim = similarity_matrix(model, text, video_dev)
    owner_t = torch.tensor(owner, dtype=torch.long)
    sampling = data_cfg.sampling("eval")
    result: dict[str, Any] = {
        "manifest": str(manifest),
        "protocol": protocol,
        "settings": {
            "num_frames": sampling.num_frames,
            "max_words": data_cfg.max_words,
            "sampling": sampling.eval_sampling,
            "fps": sampling.fps,
            "max_candidates": sampling.max_candidates,
            "image_size": data_cfg.image_size,
        },
        "n_videos": len(entries_kept),
        "n_queries": len(texts),
        "bad_videos": bad,
        **metrics_for(sim, owner_t, protocol),
        "method": model.method,
        "preset": model.preset,
        "backbone": model.clip.name,
        "backbone_fingerprint": model.backbone_fingerprint,
        "adapter_fingerprint": adapter_fingerprint(model),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if postprocess:
        # DSL re-weights over the query axis of each direction: texts for T2V, videos for V2T (CAMoE).
        dsl_t2v = metrics_for(M.dual_softmax(sim), owner_t, protocol)["t2v"]
        dsl_v2t = metrics_for(M.dual_softmax(sim.t()).t(), owner_t, protocol)["v2t"]
        result["postprocessed"] = {"dsl": {"t2v": dsl_t2v, "v2t": dsl_v2t}}
    if query_bank is not None:
        bank_texts = query_bank_captions(query_bank, query_bank_size)
        bank = encode_texts(model, bank_texts, data_cfg.max_words, device, precision)
        scale = float(model.logit_scale())  # QB-Norm's beta assumes cosine-scale scores, not logits
        bank_sim = similarity_matrix(model, bank, video_dev) / scale
        qb = M.qb_norm(sim / scale, bank_sim, k=qb_k, beta=qb_beta)
        result.setdefault("postprocessed", {})["qbnorm"] = {
            "t2v": M.retrieval_metrics(qb, owner_t),
            "bank": str(query_bank),
            "bank_queries": len(bank_texts),
            "k": qb_k,
            "beta": qb_beta,
        }
    if pairs_file is not None:
        result["reversal"] = pair_accuracy(sim, owner, entries_kept, read_pairs(pairs_file))
    if extra:
        result.update(extra)
    return result


def query_bank_captions(manifest: str | Path, size: int | None = None, seed: int = 0) -> list[str]:
    """Every caption of a manifest (the querybank), or ``size`` of them drawn without replacement (seeded)."""
    texts = [c for e in read_manifest(manifest) for c in e.captions]
    if not texts:
        raise VidretError(f"{manifest}: no captions to build a QB-Norm querybank from")
    if size is not None:
        if size <= 0:
            raise VidretError(f"query bank size must be positive, got {size}")
        if size < len(texts):
            g = torch.Generator().manual_seed(seed)
            texts = [texts[i] for i in torch.randperm(len(texts), generator=g)[:size].sort().values.tolist()]
    return texts


def adapter_fingerprint(model: VideoTextModel) -> str:
    """Fingerprint of the trained state (adapter modules, trained backbone tensors, head)."""
    state = {n: p.detach() for n, p in model.trainable_named_parameters()}
    if not state:
        return fingerprint(backbone_state_dict(model.clip))
    # biases are what some methods train: include them by renaming away the "bias" suffix rule
    return fingerprint({n + "#": t for n, t in state.items()})
