from __future__ import annotations

from pathlib import Path

import pytest

from vidret.errors import VidretError
from vidret.train.config import TrainConfig, config_from_dict, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def test_overrides_parse_nested_yaml_scalars() -> None:
    d = parse_overrides(["optim.lr=0.0001", "epochs=2", "data.cache_dir=", "method_options.cmt_layers=[0, 1]"])
    assert d == {
        "optim": {"lr": 0.0001},
        "epochs": 2,
        "data": {"cache_dir": ""},
        "method_options": {"cmt_layers": [0, 1]},
    }


def test_unknown_key_is_named() -> None:
    with pytest.raises(VidretError, match="optim.lrr"):
        config_from_dict({"optim": {"lrr": 1.0}})
    with pytest.raises(VidretError, match="'epoch'"):
        config_from_dict({"epoch": 3})


@pytest.mark.parametrize(
    ("d", "key"),
    [
        ({"precision": "fp8"}, "precision"),
        ({"epochs": "many"}, "epochs"),
        ({"epochs": 1.5}, "epochs"),
        ({"data": {"num_frames": 0}}, "num_frames"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"global_batch": 10, "grad_accum": 3}, "grad_accum"),
        ({"data": {"test_protocol": "all"}}, "data.test_protocol"),
    ],
)
def test_bad_values_fail_naming_the_key(d: dict, key: str) -> None:
    with pytest.raises(VidretError, match=key):
        config_from_dict(d)


def test_round_trip_through_dict() -> None:
    cfg = config_from_dict({"method": "lora", "optim": {"lr": 3e-4, "betas": [0.9, 0.99]}, "method_options": {"r": 4}})
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.optim.betas == (0.9, 0.99)


def test_every_shipped_config_loads() -> None:
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert len(files) >= 25
    for f in files:
        cfg = load_config(f)
        assert isinstance(cfg, TrainConfig)
        assert cfg.data.train_manifest.startswith("data/")


def test_paper_recipes() -> None:
    mv = load_config(REPO / "configs/msrvtt/mv_adapter_ViT-B-16_paper.yaml")
    assert (mv.optim.lr, mv.optim.betas, mv.optim.eps, mv.optim.weight_decay) == (5e-6, (0.9, 0.98), 1e-6, 0.2)
    assert (mv.global_batch, mv.epochs, mv.data.num_frames, mv.data.max_words) == (128, 5, 12, 32)
    an = load_config(REPO / "configs/activitynet/mv_adapter_ViT-B-16_paper.yaml")
    assert (an.global_batch, an.epochs, an.data.num_frames, an.data.max_words) == (64, 15, 32, 64)
    assert an.data.test_protocol == "paragraph"
    cm = load_config(REPO / "configs/activitynet/cross_modal_ViT-B-32.yaml")
    assert (cm.optim.lr, cm.epochs, cm.data.num_frames) == (1e-5, 20, 64)
    assert load_config(REPO / "configs/msvd/cross_modal_ViT-B-32.yaml").data.test_protocol == "multi"


@pytest.mark.parametrize("dataset", ["msrvtt", "didemo", "activitynet"])
def test_paper_and_released_variants_are_separate_files(dataset: str) -> None:
    paper = load_config(REPO / f"configs/{dataset}/mv_adapter_ViT-B-16_paper.yaml")
    released = load_config(REPO / f"configs/{dataset}/mv_adapter_ViT-B-16_released.yaml")
    assert (paper.preset, released.preset) == (f"{dataset}_paper", dataset)
    assert not (REPO / f"configs/{dataset}/mv_adapter_ViT-B-16.yaml").exists()  # no file claims both
    assert paper.optim == released.optim and paper.data == released.data  # one training recipe


def test_paper_row_configs_use_the_official_recipe() -> None:
    """MV-Adapter (and its table's baselines): BertAdam, warmup_cosine over the whole run, per-tensor clip 1.0,
    decay on names without "bias", every caption pair, frame floor(i*N/T). Cross-Modal Adapter: the same but no
    per-tensor clip and linspace frames."""
    n = 0
    for f in sorted((REPO / "configs").rglob("*.yaml")):
        if f.parent.name == "pocket":
            continue  # the pocket world's own recipe (the demo's; tests/test_walkthrough.py), not a paper row
        cfg = load_config(f)
        header = [line for line in f.read_text().splitlines() if line.startswith("#")]
        if cfg.method == "frozen":
            assert cfg.data.eval_sampling in ("mvadapter_floor", "cma_linspace")
            continue
        n += 1
        o, d = cfg.optim, cfg.data
        assert (o.name, o.schedule, o.warmup_ratio, o.grad_clip) == ("bert_adam", "bert_warmup_cosine", 0.1, 1.0), f
        assert (o.betas, o.eps, o.decay_rule, d.caption_mode) == ((0.9, 0.98), 1e-6, "mvadapter_names", "all_pairs"), f
        assert d.train_sampling == d.eval_sampling, f
        official = " ".join(header)
        if cfg.method == "cross_modal" or (cfg.method == "full" and cfg.backbone == "ViT-B-32"):
            assert d.train_sampling == "cma_linspace", f
            want_clip = 0.0 if cfg.method == "cross_modal" else 1.0  # CMA: max_grad_norm=0.0; CLIP4Clip: 1.0
            assert o.per_tensor_clip == want_clip, f
            assert "LeapLabTHU/Cross-Modal-Adapter" in official or "ArrowLuo/CLIP4Clip" in official, f
        else:
            assert (d.train_sampling, o.per_tensor_clip) == ("mvadapter_floor", 1.0), f
            assert "zhangbw17/MV-Adapter" in official and "optimizer/bert_adam.py" in official, f
    assert n >= 35


def test_new_keys_default_to_the_project_recipe_and_are_validated() -> None:
    cfg = TrainConfig()
    assert (cfg.optim.name, cfg.optim.schedule, cfg.optim.decay_rule, cfg.optim.per_tensor_clip) == (
        "adamw",
        "cosine",
        "ndim",
        0.0,
    )
    assert (cfg.data.caption_mode, cfg.data.train_sampling, cfg.data.eval_sampling) == (
        "random_per_video",
        "segment_random",
        "segment_centre",
    )
    s = cfg.data.sampling("eval")
    assert (s.rule, s.with_mode("train").rule, s.num_frames) == ("segment_centre", "segment_random", 12)
    with pytest.raises(VidretError, match="per_tensor_clip"):
        config_from_dict({"optim": {"per_tensor_clip": 1.0}})  # BertAdam's max_grad_norm: not with adamw
    with pytest.raises(VidretError, match="eval_sampling"):
        config_from_dict({"data": {"eval_sampling": "segment_random"}})
    for key, bad in [
        ("optim.name", "adam"),
        ("optim.schedule", "warmup_cosine"),
        ("optim.decay_rule", "names"),
        ("data.caption_mode", "per_caption"),
        ("data.train_sampling", "uniform"),
    ]:
        section, name = key.split(".")
        with pytest.raises(VidretError, match=key):
            config_from_dict({section: {name: bad}})
    ok = config_from_dict(
        {"optim": {"name": "bert_adam", "per_tensor_clip": 1.0}, "data": {"caption_mode": "all_pairs"}}
    )
    assert config_from_dict(ok.to_dict()) == ok


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(VidretError, match="YAML"):
        load_config(bad)


def test_yaml_exponent_without_dot_is_a_number() -> None:
    # YAML 1.1 parses "1e-4" as a string; the config accepts it as the number a user means.
    cfg = config_from_dict(parse_overrides(["optim.lr=1e-4"]))
    assert cfg.optim.lr == 1e-4
