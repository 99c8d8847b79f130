"""Hugging Face Hub repo ids as backbones, against a local fake Hub: the real cache layout and a fake download."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vidret.backbone import hub
from vidret.backbone.pretrained import convert_checkpoint, load_backbone
from vidret.errors import VidretError
from vidret.retrieval.build import loads_no_file, resolve_backbone

hf = pytest.importorskip("huggingface_hub")
transformers = pytest.importorskip("transformers")
from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError  # noqa: E402

REPO = "owner/tiny-clip"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("VIDRET_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.chdir(tmp_path)  # is_hub_id looks for a local path of that name: make sure there is none
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub.socket, "getaddrinfo", lambda *a, **k: [])  # "the Hub's name resolves"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight transformers CLIPModel (tiny config) saved with save_pretrained: what a Hub repo holds."""
    tc = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    tc |= {"num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 49407}
    vc = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    vc |= {"image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(folder, safe_serialization=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # a repo publishing both forms
    (folder / "tokenizer.json").write_text("{}")  # repos hold more than a backbone needs
    return folder


def _assert_equal(a: Any, b: Any) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config == b.config


def _cache_repo(cache: Path, src: Path, files: list[str]) -> Path:
    """Write ``files`` of ``src`` into huggingface_hub's cache layout (refs/main -> snapshots/<commit>/)."""
    repo = cache / f"models--{REPO.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name in files:
        shutil.copy(src / name, snap / name)
    return snap


class FakeHub:
    """Stands for hf_hub_download: serves a folder, records what was asked, never touches the network."""

    def __init__(self, src: Path, dst: Path) -> None:
        self.src, self.dst, self.asked = src, dst / COMMIT, []

    def __call__(self, repo_id: str, filename: str, *, revision: str | None, local_files_only: bool) -> str:
        assert repo_id == REPO and revision in (None, COMMIT) and not local_files_only
        self.asked.append(filename)
        if not (self.src / filename).is_file():
            raise EntryNotFoundError(f"404: {filename} is not in {repo_id}")
        self.dst.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.src / filename, self.dst / filename)
        return str(self.dst / filename)


def test_is_hub_id() -> None:
    for spec in ("openai/clip-vit-base-patch16", "laion/CLIP-ViT-B-32.laion2B", REPO):
        assert hub.is_hub_id(spec), spec
    for spec in ("ViT-B-16", "/abs/folder", "./a/b", "a/b/c", "~/x", "runs/model.pt", "a/../b", "a/b.git", "-a/b"):
        assert not hub.is_hub_id(spec), spec


def test_a_local_folder_of_that_name_wins(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "hf_hub_download", lambda *a, **k: pytest.fail("a local path went to the Hub"))
    shutil.copytree(saved, tmp_path / REPO)
    assert not hub.is_hub_id(REPO)
    _assert_equal(load_backbone(REPO), load_backbone(saved))


def test_downloads_only_config_and_safetensors(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeHub(saved, tmp_path / "snapshots")
    monkeypatch.setattr(hf, "hf_hub_download", fake)
    _assert_equal(load_backbone(REPO), load_backbone(saved))
    assert fake.asked == ["config.json", "model.safetensors"]
    out = convert_checkpoint(REPO, tmp_path)
    assert out.name == "owner--tiny-clip.safetensors"
    _assert_equal(load_backbone(out), load_backbone(saved))


def test_falls_back_to_pytorch_model_bin(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bin-only"
    src.mkdir()
    for name in ("config.json", "pytorch_model.bin"):
        shutil.copy(saved / name, src / name)
    fake = FakeHub(src, tmp_path / "snapshots")
    monkeypatch.setattr(hf, "hf_hub_download", fake)
    _assert_equal(load_backbone(REPO), load_backbone(saved))
    assert fake.asked == ["config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]


def test_a_non_clip_repo_is_refused_before_its_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "bert"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (src / "model.safetensors").write_bytes(b"never fetched")
    fake = FakeHub(src, tmp_path / "snapshots")
    monkeypatch.setattr(hf, "hf_hub_download", fake)
    with pytest.raises(VidretError, match="holds a 'bert' model"):
        load_backbone(REPO)
    assert fake.asked == ["config.json"]


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "VIDRET_OFFLINE"])
def test_offline_reads_the_huggingface_cache(
    saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    # the real hf_hub_download, offline, on the cache layout huggingface_hub itself writes
    monkeypatch.setenv(switch, "1")
    _cache_repo(tmp_path / "hf-cache", saved, ["config.json", "model.safetensors"])
    _assert_equal(load_backbone(REPO), load_backbone(saved))


def test_offline_with_a_bin_only_cache(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_repo(tmp_path / "hf-cache", saved, ["config.json", "pytorch_model.bin"])
    _assert_equal(load_backbone(REPO), load_backbone(saved))


@pytest.mark.parametrize("switch", ["HF_HUB_OFFLINE", "VIDRET_OFFLINE"])
def test_offline_and_not_cached_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, switch: str) -> None:
    monkeypatch.setenv(switch, "1")
    with pytest.raises(VidretError) as info:
        load_backbone(REPO)
    msg = str(info.value)
    assert "\n" not in msg
    assert REPO in msg and f"{switch} is set" in msg and str(tmp_path / "hf-cache") in msg
    assert "--backbone /path/to/folder" in msg and "vidret.load_backbone('/path/to/folder')" in msg


def test_offline_config_but_no_weights_cached(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_repo(tmp_path / "hf-cache", saved, ["config.json"])
    with pytest.raises(VidretError, match="HF_HUB_OFFLINE is set and its weights are not in the Hugging Face cache"):
        load_backbone(REPO)


def test_no_network_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*a: Any, **k: Any) -> str:  # what hf_hub_download raises when the Hub cannot be reached
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.\nmore")

    monkeypatch.setattr(hf, "hf_hub_download", unreachable)
    with pytest.raises(VidretError, match="the Hub cannot be reached and it is not in the Hugging Face cache") as info:
        load_backbone(REPO)
    assert "\n" not in str(info.value) and "--backbone /path/to/folder" in str(info.value)


def _no_dns(*a: Any, **k: Any) -> Any:
    raise socket.gaierror(-3, "Temporary failure in name resolution")


def test_no_dns_reads_the_cache_at_once(saved: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub would retry the look-up for ~25 s before falling back to its cache
    monkeypatch.setattr(hub.socket, "getaddrinfo", _no_dns)
    _cache_repo(tmp_path / "hf-cache", saved, ["config.json", "model.safetensors"])
    _assert_equal(load_backbone(REPO), load_backbone(saved))


def test_no_dns_and_not_cached_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub.socket, "getaddrinfo", _no_dns)
    start = time.monotonic()
    with pytest.raises(VidretError, match=r"no network \(cannot resolve huggingface.co: ") as info:
        load_backbone(REPO)
    assert time.monotonic() - start < 5
    assert "\n" not in str(info.value) and REPO in str(info.value) and "--backbone /path/to/folder" in str(info.value)


def test_recorded_hub_ids_are_followed_as_names(tmp_path: Path) -> None:
    assert loads_no_file(REPO)
    assert resolve_backbone(None, {"extra": {"backbone_source": REPO}}) == REPO
    assert resolve_backbone(None, {}, REPO, where="index X") == REPO
    (tmp_path / "owner").mkdir()
    (tmp_path / REPO).write_bytes(b"a local file of that name: a path, never followed from a record")
    assert not loads_no_file(REPO)
    with pytest.raises(VidretError, match="--backbone"):
        resolve_backbone(None, {}, REPO, where="index X")
