"""The official recipes, pinned: BertAdam's update, warmup_cosine, the decay rule, the frame rules, every caption
pair per epoch; the recipe card; paper configs training on the tiny pocket world with every new option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vidret.backbone.clip import create_backbone
from vidret.cli import main
from vidret.data.manifest import read_manifest
from vidret.data.sampling import select_indices
from vidret.model import build_model
from vidret.train.config import OptimConfig, config_from_dict, load_config
from vidret.train.loop import train
from vidret.train.optim import BertAdam, lr_factor, param_groups
from vidret.train.recipe import recipe_card

from .test_loop import MV_TINY, cfg_dict

REPO = Path(__file__).resolve().parents[2]

# ----------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(("x", "want"), [(0.05, 0.5), (0.1, 0.9755), (0.389, 0.6708), (0.5, 0.5), (0.9, 0.0245)])
def test_bert_warmup_cosine_values(x: float, want: float) -> None:
    total = 1000
    f = lr_factor(round(x * total), total, 0.1, "bert_warmup_cosine")
    assert f == pytest.approx(want, abs=5e-5)
    # the official warmup_cosine(x, warmup): x / warmup below warmup, else 0.5 * (1 + cos(pi * x)), written out
    assert f == (x / 0.1 if x < 0.1 else 0.5 * (1.0 + math.cos(math.pi * x)))


def test_bert_schedule_is_one_cosine_over_the_run_unlike_the_restarted_one() -> None:
    total = 10_000
    bert = np.array([lr_factor(s, total, 0.1, "bert_warmup_cosine") for s in range(total)])
    ours = np.array([lr_factor(s, total, 0.1, "cosine") for s in range(total)])
    assert bert[0] == 0.0 and ours[0] == pytest.approx(1 / 1000)  # the official first step has lr 0
    assert bert[999] == pytest.approx(0.999) and bert[1000] == pytest.approx(0.97553, abs=1e-5)  # the jump at w
    assert ours[1000] == 1.0  # the restarted cosine starts again at 1 after warmup
    assert np.abs(ours - bert).max() == pytest.approx(0.0956, abs=1e-3)  # the measured departure
    assert ours.mean() / bert.mean() == pytest.approx(1.109, abs=1e-3)  # "mean lr 11% higher"


# ----------------------------------------------------------------------------------------------- BertAdam


def _bert_adam_reference(p, grads, lr, wd, b1, b2, eps, max_norm):  # float64 numpy, the official step written out
    m, v, p = np.zeros_like(p), np.zeros_like(p), p.copy()
    for g in grads:
        g = g * min(1.0, max_norm / (np.linalg.norm(g) + 1e-6))  # clip_grad_norm_(p, max_grad_norm), per tensor
        m = b1 * m + (1 - b1) * g  # next_m, no bias correction
        v = b2 * v + (1 - b2) * g * g  # next_v
        update = m / (np.sqrt(v) + eps)
        update = update + wd * p  # decoupled decay, added before the lr multiplies the update
        p = p - lr * update
    return p


def test_bert_adam_update_matches_the_official_formula() -> None:
    p0 = np.array([0.5, -1.0, 2.0])
    grads = [np.array([3.0, 4.0, 0.0]), np.array([0.1, -0.2, 0.3]), np.array([-2.0, 0.5, 1.0])]  # norms 5, .37, 2.3
    lr, wd, b1, b2, eps = 0.01, 0.2, 0.9, 0.98, 1e-6
    p = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = BertAdam([{"params": [p], "lr": lr, "weight_decay": wd}], betas=(b1, b2), eps=eps, max_grad_norm=1.0)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    want = _bert_adam_reference(p0, grads, lr, wd, b1, b2, eps, 1.0)
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-13, atol=1e-15)
    assert set(opt.state[p]) == {"exp_avg", "exp_avg_sq"}
    # without the per-tensor clip the first gradient (norm 5) moves p differently
    assert not np.allclose(want, _bert_adam_reference(p0, grads, lr, wd, b1, b2, eps, math.inf))


def test_bert_adam_first_step_is_0_71_of_adamw_and_decay_is_decoupled() -> None:
    g = torch.tensor([0.5, -0.25, 2.0])
    steps = {}
    for name in ("bert_adam", "adamw"):
        p = torch.nn.Parameter(torch.zeros(3))
        cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.0)  # type: ignore[arg-type]
        opt = (
            BertAdam(param_groups([("w", p)], cfg), betas=cfg.betas, eps=cfg.eps)
            if name == "bert_adam"
            else torch.optim.AdamW(param_groups([("w", p)], cfg), betas=cfg.betas, eps=cfg.eps)
        )
        p.grad = g.clone()
        opt.step()
        steps[name] = p.detach().clone()
    # no bias correction: (1 - b1) / sqrt(1 - b2) = 0.1 / sqrt(0.02) = 0.7071 of AdamW's first step
    torch.testing.assert_close(steps["bert_adam"] / steps["adamw"], torch.full((3,), 0.70711), atol=1e-4, rtol=0)
    # a zero gradient leaves only the decay: p <- p - lr * wd * p
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = BertAdam([{"params": [p], "lr": 0.1, "weight_decay": 0.2}])
    p.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0], dtype=torch.float64) * (1 - 0.1 * 0.2))


# ----------------------------------------------------------------------------------------------- decay groups


def test_mvadapter_name_rule_decays_norms_tokens_and_factors() -> None:
    model = build_model(create_backbone("pocket-tiny", seed=0), "mv_adapter", **MV_TINY)
    named = model.trainable_named_parameters()
    adapter = [(n, p) for n, p in named if not n.startswith("backbone.")]
    by_id = {id(p): n for n, p in named}

    def groups(rule: str) -> dict[str, set[str]]:
        gs = param_groups(named, OptimConfig(decay_rule=rule, backbone_weight_decay=0.2))  # type: ignore[arg-type]
        return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in gs}

    names, ndim = groups("mvadapter_names"), groups("ndim")
    assert names["decay"] == {n for n, _ in adapter if "bias" not in n}
    assert names["no_decay"] == {n for n, _ in adapter if "bias" in n}
    assert ndim["decay"] == {n for n, p in adapter if p.ndim >= 2}
    moved = names["decay"] - ndim["decay"]  # what the official rule decays on top
    assert any(n.endswith(".cc") for n in moved) and any("ln_pre.weight" in n for n in moved)
    assert any(n.endswith(".factor") for n in moved)  # the CMT factors
    assert names["backbone"] == ndim["backbone"] and all(n.startswith("backbone.") for n in names["backbone"])
    # Cross-Modal Adapter's tensors are matrices and biases: its official name rule gives the ndim groups
    cma = build_model(create_backbone("pocket-tiny", seed=0), "cross_modal").trainable_named_parameters()
    by_rule = [
        [[id(p) for p in g["params"]] for g in param_groups(cma, OptimConfig(decay_rule=rule))]  # type: ignore[arg-type]
        for rule in ("ndim", "mvadapter_names")
    ]
    assert by_rule[0] == by_rule[1]


# ----------------------------------------------------------------------------------------------- frame rules


def _official_mvadapter(n: int, t: int) -> list[int]:  # dataloaders/retrieval_dt.py, sample_method 2
    index = [0]
    for i in range(t):
        cur = i * n // t
        if index[-1] != cur:
            index.append(cur)
    return index


def test_frame_rules_match_the_official_expressions() -> None:
    assert select_indices(20, 12, "mvadapter_floor")[0].tolist() == [0, 1, 3, 5, 6, 8, 10, 11, 13, 15, 16, 18]
    # truncated, not rounded (round would give 0, 2, 3, 5, 7, 9, 10, 12, 14, 16, 17, 19)
    assert select_indices(20, 12, "cma_linspace")[0].tolist() == [0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19]
    for t in (1, 4, 12, 32):
        for n in range(t + 1, 200):
            assert select_indices(n, t, "mvadapter_floor")[0].tolist() == _official_mvadapter(n, t)
            want = list(np.linspace(0, n - 1, num=t, dtype=int))  # dataloader_retrieval_images.py
            assert select_indices(n, t, "cma_linspace")[0].tolist() == want
    for rule in ("mvadapter_floor", "cma_linspace"):  # fewer candidates than frames: all of them, then padding
        idx, mask = select_indices(3, 5, rule)  # type: ignore[arg-type]
        assert idx.tolist() == [0, 1, 2, -1, -1] and mask.tolist() == [True] * 3 + [False] * 2


# ----------------------------------------------------------------------------------------------- recipe card


def _tiny_cfg(world: Path, out: Path, **optim: object) -> dict:
    d = cfg_dict(world, out)
    d["optim"] = {"lr": 1e-3, **optim}
    d["data"]["caption_mode"] = "all_pairs"
    return d


def test_recipe_card_of_a_pocket_config(tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d = _tiny_cfg(tiny_world, tmp_path / "run", name="bert_adam", schedule="bert_warmup_cosine", per_tensor_clip=1.0)
    d["max_steps"] = 5
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["recipe", str(path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    captions = sum(len(e.captions) for e in read_manifest(tiny_world / "train.jsonl"))
    assert card["train_manifest"]["items_per_epoch"] == captions  # every (video, caption) pair
    assert card["steps"]["per_epoch"] == captions // 4 and card["steps"]["total"] == min(5, 2 * (captions // 4))
    total = card["steps"]["total"]
    assert card["schedule"]["lr_factor"]["0.0"] == 0.0 and card["schedule"]["steps"] == total
    assert card["schedule"]["lr_factor"]["0.5"] == lr_factor(round(0.5 * total), total, 0.1, "bert_warmup_cosine")
    model = build_model(create_backbone("pocket-tiny", seed=0), "mv_adapter", **MV_TINY)
    named = model.trainable_named_parameters()
    assert card["trainable_params"] == sum(p.numel() for _, p in named)
    real = param_groups(named, load_config(path).optim)
    assert [(g["name"], g["tensors"], g["lr"], g["weight_decay"]) for g in card["param_groups"]] == [
        (g["name"], len(g["params"]), g["lr"], g["weight_decay"]) for g in real
    ]
    assert card["optimizer"]["per_tensor_clip"] == 1.0 and card["train"]["caption_mode"] == "all_pairs"
    # train --dry-run prints the same card as text and trains nothing
    assert main(["train", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"{captions // 4}/epoch" in text and "bert_adam" in text and "0.05:" in text
    assert not (tmp_path / "run").exists()


def test_recipe_subcommand_has_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["recipe", "--help"])
    assert e.value.code == 0 and "--json" in capsys.readouterr().out


def test_recipe_card_without_the_manifest_still_shows_the_recipe(capsys: pytest.CaptureFixture) -> None:
    paper = REPO / "configs/msrvtt/mv_adapter_ViT-B-16_paper.yaml"
    assert main(["recipe", str(paper), "data.train_manifest=/nonexistent/train.jsonl"]) == 0
    text = capsys.readouterr().out
    assert "MISSING" in text and "mvadapter_floor" in text and "bert_warmup_cosine" in text
    card = recipe_card(load_config(paper, ["data.train_manifest=/nonexistent/train.jsonl"]))
    assert card["steps"]["total"] is None and card["schedule"]["steps"] == 1000
    f = card["schedule"]["lr_factor"]
    assert [round(f[k], 4) for k in ("0.05", "0.1", "0.5", "0.9", "1.0")] == [0.5, 0.9755, 0.5, 0.0245, 0.0]
    groups = {g["name"]: g for g in card["param_groups"]}
    assert (groups["backbone"]["params"], groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (
        171_008,  # every CLIP ViT-B/16 bias term
        1e-7,
        0.2,
    )
    assert card["trainable_params"] == 3_572_736  # 2.388% of ViT-B/16: the paper's 2.39%


# ----------------------------------------------------------------------------------------------- training


def _paper_overrides(world: Path, out: Path) -> list[str]:
    return [
        "backbone=random:pocket-tiny",
        f"method_options={json.dumps(MV_TINY)}",
        f"data.train_manifest={world / 'train.jsonl'}",
        "data.test_manifest=",
        "data.cache_dir=",
        "data.num_frames=4",  # 8 candidate frames per pocket clip: the rule picks 4 of them
        "data.image_size=32",
        "data.max_words=16",
        "data.num_workers=0",
        "global_batch=4",
        "max_steps=3",
        "precision=fp32",
        "device=cpu",
        "log_every=1",
        f"out_dir={out}",
    ]


def _spy_rules(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    import vidret.data.dataset as dataset

    seen: list[tuple[str, str]] = []
    real = dataset.sample_timestamps

    def spy(duration, config, *a, **kw):  # type: ignore[no-untyped-def]
        seen.append((config.mode, config.rule))
        return real(duration, config, *a, **kw)

    monkeypatch.setattr(dataset, "sample_timestamps", spy)
    return seen


def test_mv_adapter_paper_config_trains_with_the_official_recipe(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paper = REPO / "configs/msrvtt/mv_adapter_ViT-B-16_paper.yaml"
    cfg = load_config(paper, _paper_overrides(tiny_world, tmp_path / "run"))
    o, d = cfg.optim, cfg.data
    assert (o.name, o.schedule, o.per_tensor_clip, o.decay_rule) == (
        "bert_adam",
        "bert_warmup_cosine",
        1.0,
        "mvadapter_names",
    )
    assert (d.caption_mode, d.train_sampling, cfg.preset) == ("all_pairs", "mvadapter_floor", "msrvtt_paper")
    seen = _spy_rules(monkeypatch)
    res = train(cfg, progress=False)
    assert res.steps == 3
    assert seen and set(seen) == {("train", "mvadapter_floor")}
    lrs = [json.loads(x)["lr"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    # 5e-6 x warmup_cosine at x = 0, 1/3, 2/3 of the 3-step run: 0, 0.75, 0.25
    assert lrs == pytest.approx([0.0, 5e-6 * 0.75, 5e-6 * 0.25], rel=1e-12, abs=0)
    groups = json.loads((tmp_path / "run/checkpoint.json").read_text())["optimizer"]["param_groups"]
    assert [(g["name"], g["weight_decay"], g["max_grad_norm"]) for g in groups] == [
        ("decay", 0.2, 1.0),
        ("no_decay", 0.0, 1.0),
        ("backbone", 0.2, 1.0),
    ]
    assert groups[2]["initial_lr"] == 1e-7


def test_cross_modal_paper_config_trains_with_linspace_frames(
    tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _spy_rules(monkeypatch)
    overrides = [x for x in _paper_overrides(tiny_world, tmp_path / "run") if not x.startswith("method_options")]
    rc = main(["train", str(REPO / "configs/msrvtt/cross_modal_ViT-B-32.yaml"), *overrides, "--no-progress"])
    assert rc == 0
    assert seen and set(seen) == {("train", "cma_linspace")}
    saved = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert saved["optim"]["name"] == "bert_adam" and saved["optim"]["per_tensor_clip"] == 0.0
    assert (tmp_path / "run/adapter/adapter.json").is_file()


def test_resume_refuses_another_optimiser(tiny_world: Path, tmp_path: Path) -> None:
    from vidret.errors import VidretError

    d = _tiny_cfg(tiny_world, tmp_path / "r")
    d["epochs"] = 1
    train(config_from_dict(d), progress=False)
    d["optim"] = {"lr": 1e-3, "name": "bert_adam"}
    with pytest.raises(VidretError, match="optim.name"):
        train(config_from_dict(d), resume=True, progress=False)
