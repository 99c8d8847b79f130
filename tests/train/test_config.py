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
    mv = load_config(REPO / "configs/msrvtt/mv_adapter_ViT-B-16.yaml")
    assert (mv.optim.lr, mv.optim.betas, mv.optim.eps, mv.optim.weight_decay) == (5e-6, (0.9, 0.98), 1e-6, 0.2)
    assert (mv.global_batch, mv.epochs, mv.data.num_frames, mv.data.max_words) == (128, 5, 12, 32)
    an = load_config(REPO / "configs/activitynet/mv_adapter_ViT-B-16.yaml")
    assert (an.global_batch, an.epochs, an.data.num_frames, an.data.max_words) == (64, 15, 32, 64)
    assert an.data.test_protocol == "paragraph"
    cm = load_config(REPO / "configs/activitynet/cross_modal_ViT-B-32.yaml")
    assert (cm.optim.lr, cm.epochs, cm.data.num_frames) == (1e-5, 20, 64)
    assert load_config(REPO / "configs/msvd/cross_modal_ViT-B-32.yaml").data.test_protocol == "multi"


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
