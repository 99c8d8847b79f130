"""Loading real checkpoint formats, the sha256-checked download (against a local HTTP server), clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.backbone.torchscript import write_torchscript
from vidret.backbone import pretrained
from vidret.backbone.clip import CLIP, get_config
from vidret.backbone.convert import from_openai, load_state_dict_strict, to_hf, to_openai
from vidret.backbone.pretrained import (
    PRETRAINED,
    PretrainedSource,
    backbone_info,
    convert_checkpoint,
    download,
    list_backbones,
    load_backbone,
    load_checkpoint,
)
from vidret.errors import VidretError

TINY = get_config("pocket-tiny")
# The tests write OpenAI-style TorchScript archives; torch 2.x marks torch.jit.script as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VIDRET_OFFLINE", raising=False)
    monkeypatch.setenv("VIDRET_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(pretrained, "_RETRY_WAITS_S", (0.0, 0.0))


def _ours(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = CLIP(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.state_dict()


def _reference(sd: dict[str, torch.Tensor]) -> CLIP:
    model = CLIP(TINY)
    load_state_dict_strict(model, sd)
    return model.eval()


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TOKENS = torch.zeros(2, 77, dtype=torch.long)
TOKENS[0, :7] = torch.tensor([49406, 320, 1125, 539, 320, 2368, 49407])
TOKENS[1, :3] = torch.tensor([49406, 1929, 49407])


def _assert_same_outputs(a: CLIP, b: CLIP) -> None:
    with torch.no_grad():
        assert torch.equal(a.encode_image(IMAGES), b.encode_image(IMAGES))
        assert torch.equal(a.encode_text(TOKENS), b.encode_text(TOKENS))


def _openai_file_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    """What OpenAI ships: OpenAI keys, fp16 weights, three scalar buffers."""
    sd = {k: v.half() for k, v in to_openai(_ours(seed)).items()}
    sd |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}
    return sd


# ----------------------------------------------------------------------------------------- file formats


def test_openai_torchscript_archive_loads_like_its_state_dict(tmp_path: Path) -> None:
    sd = _openai_file_sd()
    path = tmp_path / "ViT-tiny.pt"
    write_torchscript(sd, path)
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.layout, ckpt.config.name) == ("torchscript", "openai", "pocket-tiny")
    model = load_backbone(path)
    assert not model.training and model.visual.conv1.weight.dtype == torch.float32
    _assert_same_outputs(model, _reference(from_openai(sd)))  # the state dict the archive holds


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_openai_state_dict_pt(tmp_path: Path, legacy: bool) -> None:
    sd = to_openai(_ours())
    path = tmp_path / "weights.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    assert load_checkpoint(path).format == "torch"
    _assert_same_outputs(load_backbone(path), _reference(_ours()))


def test_open_clip_training_checkpoint(tmp_path: Path) -> None:
    inner = {"module." + k: v for k, v in to_openai(_ours()).items()}
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": inner, "optimizer": {"lr": 1e-4}}, path)
    _assert_same_outputs(load_backbone(path), _reference(_ours()))


def test_format_is_detected_by_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"  # safetensors content under a torch-ish name
    save_file(to_hf(_ours()), str(path))
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.layout) == ("safetensors", "hf")
    _assert_same_outputs(load_backbone(path), _reference(_ours()))


def test_hf_clipmodel_directory_uses_config_heads(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tc = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1}
    tc |= {"num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "eos_token_id": 49407}
    vc = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": 8}
    vc |= {"image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    torch.manual_seed(0)
    hf = transformers.CLIPModel(transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    model = load_backbone(tmp_path / "hf")
    assert (model.config.vision.heads, model.config.text.heads) == (8, 4)  # not width // 64 == 1
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=IMAGES)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
        torch.testing.assert_close(model.encode_image(IMAGES), ref, atol=1e-5, rtol=0)
    # the weights file alone finds its config.json beside it
    weights = next(p for p in (tmp_path / "hf").iterdir() if p.name.startswith("model"))
    assert load_checkpoint(weights).config == model.config


def test_hf_directory_with_gelu_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "laion"
    d.mkdir()
    save_file(to_hf(_ours()), str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "clip", "text_config": {"hidden_act": "gelu"}}))
    with pytest.raises(VidretError, match="activation 'gelu'"):
        load_backbone(d)


def test_convert_checkpoint_to_safetensors(tmp_path: Path) -> None:
    src = tmp_path / "ViT-tiny.pt"
    sd = _openai_file_sd(seed=2)
    write_torchscript(sd, src)
    out = convert_checkpoint(src, tmp_path)
    assert out == tmp_path / "ViT-tiny.safetensors"
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("visual.transformer.resblocks.0.attn.q_proj.weight").dtype == torch.float16
    assert json.loads(meta["vidret_config"]) == TINY.to_dict()
    ckpt = load_checkpoint(out)
    assert (ckpt.format, ckpt.layout, ckpt.config) == ("safetensors", "vidret", TINY)
    _assert_same_outputs(load_backbone(out), load_backbone(src))
    fp32 = convert_checkpoint(src, tmp_path / "sub" / "f32.safetensors", dtype=torch.float32)
    assert load_checkpoint(fp32).state_dict["visual.proj"].dtype == torch.float32
    with pytest.raises(VidretError, match=r"must end in \.safetensors"):
        convert_checkpoint(src, tmp_path / "out.pt")


def test_backbone_info_for_files_and_names(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(to_openai(_ours()), path)
    info = backbone_info(path)
    model = CLIP(TINY)
    counts = info["parameters"]
    assert counts["visual"] == sum(p.numel() for p in model.visual.parameters())
    assert counts["text"] == sum(p.numel() for p in model.text.parameters())
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == counts["visual"] + counts["text"] + 1
    assert info["name"] == "pocket-tiny" and info["architecture"] == TINY.to_dict()
    assert "openai" in info["format"] and info["fingerprint"]

    b16 = backbone_info("ViT-B-16", cache_dir=tmp_path / "cache")  # no download
    assert b16["pretrained"]["sha256"] in b16["source"] and b16["pretrained"]["cached"] is None
    assert 85e6 < b16["parameters"]["visual"] < 87e6 and 63e6 < b16["parameters"]["text"] < 64e6
    assert backbone_info("pocket-tiny")["pretrained"] is None
    assert not (tmp_path / "cache").exists()


def test_list_backbones_and_pretrained_table() -> None:
    names = list_backbones()
    assert {"ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "pocket-tiny"} <= set(names)
    for name, src in PRETRAINED.items():
        assert name in names and src.config == name
        assert len(src.sha256) == 64 and int(src.sha256, 16) >= 0
        if src.package_file:  # shipped inside the package (pocket-small): no URL (tests/train/test_pretrain.py)
            assert src.url == "" and src.filename == f"{name}.safetensors"
            continue
        assert src.url == f"https://openaipublic.azureedge.net/clip/models/{src.sha256}/{src.filename}"


# --------------------------------------------------------------------------------------------- errors


def _good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    torch.save(to_openai(_ours()), path)
    return path


def test_corrupt_file(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(VidretError, match="not a checkpoint vidret can read"):
        load_backbone(path)


@pytest.mark.parametrize("kind", ["zip", "safetensors", "torchscript"])
def test_truncated_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"full.{kind}"
    if kind == "zip":
        torch.save(to_openai(_ours()), path)
    elif kind == "safetensors":
        save_file(_ours(), str(path))
    else:
        write_torchscript(_openai_file_sd(), path)
    data = path.read_bytes()
    half = tmp_path / f"half.{kind}"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(VidretError, match="corrupt or truncated|truncated") as info:
        load_backbone(half)
    assert str(half) in str(info.value)


def test_wrong_architecture_names_the_keys(tmp_path: Path) -> None:
    sd = to_openai(_ours())
    del sd["transformer.resblocks.1.mlp.c_fc.bias"]
    sd["visual.ln_post.weight"] = torch.ones(7)
    path = tmp_path / "wrong.pt"
    torch.save(sd, path)
    with pytest.raises(VidretError) as info:
        load_backbone(path)
    msg = str(info.value)
    assert "text.transformer.resblocks.1.mlp.c_fc.bias" in msg and "missing" in msg
    assert "visual.ln_post.weight (7,) != (32,)" in msg


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(CLIP(TINY), path)  # a whole module: needs code to unpickle
    with pytest.raises(VidretError, match="never unpickles code"):
        load_backbone(path)


def test_name_and_path_errors(tmp_path: Path) -> None:
    with pytest.raises(VidretError, match="create_backbone"):
        load_backbone("pocket-tiny")
    with pytest.raises(VidretError, match="unknown backbone 'ViT-H-99'.*ViT-B-16"):
        load_backbone("ViT-H-99")
    with pytest.raises(VidretError, match="no such checkpoint"):
        load_backbone(tmp_path / "missing.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(VidretError, match="without config.json"):
        load_backbone(tmp_path / "d")


# ------------------------------------------------------------------------------------------- download


class _Server(ThreadingHTTPServer):
    payloads: dict[str, bytes]
    requests: list[tuple[str, str | None]]
    cut_next: int  # this many upcoming responses stop half-way (a dropped connection)
    honour_range: bool


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        data = srv.payloads.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng and srv.honour_range else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_next > 0:
            srv.cut_next -= 1
            self.wfile.write(body[: len(body) // 2])
            return  # HTTP/1.0: the connection closes with the body short
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.payloads, srv.requests, srv.cut_next, srv.honour_range = {}, [], 0, True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def published(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, PretrainedSource]:
    """A tiny OpenAI-style TorchScript file served as pretrained name 'tiny'."""
    path = tmp_path / "published.pt"
    write_torchscript(_openai_file_sd(seed=5), path)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    server.payloads[f"/clip/{digest}/ViT-tiny.pt"] = data
    host, port = server.server_address[:2]
    src = PretrainedSource("pocket-tiny", f"http://{host}:{port}/clip/{digest}/ViT-tiny.pt", digest)
    monkeypatch.setitem(PRETRAINED, "tiny", src)
    return data, src


def test_download_then_cache_hit(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, src = published
    cache = tmp_path / "cache"
    model = load_backbone("tiny", cache_dir=cache, progress=False)
    assert (cache / "ViT-tiny.pt").read_bytes() == data
    assert not (cache / "ViT-tiny.pt.part").exists()
    assert len(server.requests) == 1
    again = load_backbone("tiny", cache_dir=cache, progress=False)
    assert len(server.requests) == 1  # served from the cache
    _assert_same_outputs(model, again)
    _assert_same_outputs(model, load_backbone(cache / "ViT-tiny.pt"))
    monkeypatch.setenv("VIDRET_OFFLINE", "1")  # a cached file needs no network
    _assert_same_outputs(model, load_backbone("tiny", cache_dir=cache))


def test_default_cache_dir_comes_from_env(published: tuple[bytes, PretrainedSource], tmp_path: Path) -> None:
    path = download("tiny", progress=False)
    assert path == tmp_path / "default-cache" / "ViT-tiny.pt"


def test_sha_mismatch_deletes_only_the_bad_download(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = published
    wrong = "0" * 64
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedSource("pocket-tiny", src.url, wrong))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "other.pt").write_bytes(b"keep me")
    (cache / "ViT-B-16.pt.part").write_bytes(b"someone else's partial download")
    with pytest.raises(VidretError, match=f"sha256 mismatch.*got {src.sha256}, expected {wrong}.*Deleted") as info:
        download("tiny", cache, progress=False)
    assert "ViT-tiny.pt.part" in str(info.value)
    left = sorted(p.name for p in cache.iterdir() if p.suffix != ".lock")
    assert left == ["ViT-B-16.pt.part", "other.pt"]
    assert (cache / "other.pt").read_bytes() == b"keep me"


def test_partial_file_is_resumed_with_range(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path
) -> None:
    data, _ = published
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-tiny.pt.part").write_bytes(data[:1000])
    path = download("tiny", cache, progress=False)
    assert path.read_bytes() == data
    assert server.requests[-1][1] == "bytes=1000-"


def test_dropped_connection_is_retried_and_resumed(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path
) -> None:
    data, _ = published
    server.cut_next = 1
    path = download("tiny", tmp_path / "cache", progress=False)
    assert path.read_bytes() == data
    assert [r[1] for r in server.requests] == [None, f"bytes={len(data) // 2}-"]


def test_server_without_range_support_restarts(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path
) -> None:
    data, _ = published
    server.honour_range = False
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-tiny.pt.part").write_bytes(b"x" * 500)
    assert download("tiny", cache, progress=False).read_bytes() == data


def test_complete_part_file_is_verified_not_refetched(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path
) -> None:
    data, _ = published
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-tiny.pt.part").write_bytes(data)  # crashed after downloading, before the rename
    assert download("tiny", cache, progress=False).read_bytes() == data
    assert server.requests == [(server.requests[0][0], f"bytes={len(data)}-")]  # answered 416


def test_corrupted_cache_entry_is_replaced(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path
) -> None:
    data, _ = published
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-tiny.pt").write_bytes(data[:-1] + b"!")
    assert download("tiny", cache, progress=False).read_bytes() == data
    assert len(server.requests) == 1


def test_offline_mode_says_what_to_fetch(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = published
    monkeypatch.setenv("VIDRET_OFFLINE", "1")
    with pytest.raises(VidretError) as info:
        load_backbone("tiny", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert src.url in msg and "VIDRET_OFFLINE" in msg
    assert "vidret.load_backbone('/path/ViT-tiny.pt')" in msg and "--backbone /path/ViT-tiny.pt" in msg
    assert server.requests == []


def test_no_network_gives_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{'a' * 64}/ViT-tiny.pt"
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedSource("pocket-tiny", url, "a" * 64))
    with pytest.raises(VidretError, match="3 attempts failed") as info:
        load_backbone("tiny", cache_dir=tmp_path / "cache", progress=False)
    assert url in str(info.value) and "load_backbone('/path/ViT-tiny.pt')" in str(info.value)


def test_http_404_is_not_retried(server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/{'b' * 64}/gone.pt"
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedSource("pocket-tiny", url, "b" * 64))
    with pytest.raises(VidretError, match="HTTP 404"):
        download("tiny", tmp_path / "cache", progress=False)
    assert len(server.requests) == 1


def test_pretrained_name_must_hold_its_architecture(
    server: _Server, published: tuple[bytes, PretrainedSource], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = published
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedSource("ViT-B-32", src.url, src.sha256))
    with pytest.raises(VidretError, match="holds a pocket-tiny architecture, not ViT-B-32"):
        load_backbone("tiny", cache_dir=tmp_path / "cache", progress=False)


def test_a_host_that_does_not_resolve_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An offline machine fails the name lookup: that is not worth the retries (about 20 s with the real waits).
    monkeypatch.setattr(pretrained, "_RETRY_WAITS_S", (60.0, 60.0))  # a retry would make this test hang
    calls: list[str] = []

    def no_dns(req: Any, timeout: float = 0) -> Any:
        calls.append(req.full_url)
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_dns)
    url = f"https://weights.invalid/{'a' * 64}/ViT-tiny.pt"
    monkeypatch.setitem(PRETRAINED, "tiny", PretrainedSource("pocket-tiny", url, "a" * 64))
    with pytest.raises(VidretError, match="no network") as info:
        load_backbone("tiny", cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1 and "load_backbone('/path/ViT-tiny.pt')" in str(info.value)
