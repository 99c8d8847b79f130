"""The query path: text-side model without vision weights, the query-embedding cache, int8 text tower,
`vidret search --interactive / --url / --captions`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import vidret
from tests.retrieval.helpers import BACKBONE, COLOURS, running_server, save_adapter_for
from vidret.adapters.base import backbone_named_parameters, backbone_state_dict
from vidret.backbone.tokenizer import tokenize
from vidret.cli import main
from vidret.errors import VidretError
from vidret.retrieval.build import build_index, open_model_for_index
from vidret.retrieval.index import VideoIndex
from vidret.retrieval.query import (
    TextCache,
    encode_texts,
    open_text_model_for_index,
    quantize_text_tower,
    rank_captions,
    read_caption_bank,
)

SENTENCES = ["a red square", "a dog catches a frisbee", "blue", "someone is cooking pasta in a kitchen"]


def _backbone_file(path: Path, seed: int = 0) -> Path:
    clip = vidret.create_backbone("pocket-tiny", seed=seed).eval()
    save_file(
        {k: v.contiguous() for k, v in backbone_state_dict(clip).items()},
        str(path),
        metadata={"vidret_config": json.dumps(clip.config.to_dict())},
    )
    return path


@pytest.fixture(scope="module", params=["lora", "mv_adapter"])
def file_index(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, collection_dir: Path):
    """An index built over a backbone *file* (the path a real checkpoint takes), per method."""
    root = tmp_path_factory.mktemp(f"q-{request.param}")
    bb = _backbone_file(root / "backbone.safetensors")
    extra = {"cmt_layers": (-2, -1)} if request.param == "mv_adapter" else {}
    adapter = save_adapter_for(root / "adapter", request.param, seed=3, **extra)
    model = vidret.load_adapter(vidret.load_backbone(bb), adapter).eval()
    out = root / "ix"
    build_index(model, collection_dir, out, backbone_spec=str(bb), adapter_path=str(adapter))
    return out, bb, adapter


def _text(model, texts: list[str], max_words: int) -> torch.Tensor:
    with torch.no_grad():
        return model.encode_text(tokenize(texts, context_length=max_words, truncate=True)).float()


def test_text_side_model_has_no_vision_weights_and_encodes_like_the_full_model(file_index) -> None:
    out, bb, _ = file_index
    index = VideoIndex.load(out)
    full = open_model_for_index(index, backbone=str(bb))
    text_only = open_text_model_for_index(index, backbone=str(bb))
    frozen_visual = [p for n, p in backbone_named_parameters(text_only.clip) if n.startswith("visual.")]
    trained = {id(p) for _, p in text_only.trainable_named_parameters()}
    assert frozen_visual and all(p.is_meta for p in frozen_visual if id(p) not in trained)
    assert not any(p.is_meta for p in text_only.clip.text.parameters())
    assert text_only.backbone_fingerprint == full.backbone_fingerprint
    w = index.settings.max_words
    torch.testing.assert_close(_text(text_only, SENTENCES, w), _text(full, SENTENCES, w), rtol=0, atol=0)
    a = index.search_text(full, _text(full, SENTENCES, w), 5)
    b = index.search_text(text_only, _text(text_only, SENTENCES, w), 5)
    assert torch.equal(a[1], b[1])


def test_text_side_model_refuses_another_backbone(file_index, tmp_path: Path) -> None:
    out, _, _ = file_index
    other = _backbone_file(tmp_path / "other.safetensors", seed=7)
    with pytest.raises(VidretError, match="fingerprint"):
        open_text_model_for_index(VideoIndex.load(out), backbone=str(other))


def test_text_side_model_of_a_frozen_adapter(tmp_path: Path, collection_dir: Path, frozen_adapter: Path) -> None:
    """No trainables: the adapter's identity is the whole backbone's, still checked (then vision is dropped)."""
    bb = _backbone_file(tmp_path / "bb.safetensors")
    model = vidret.load_adapter(vidret.load_backbone(bb), frozen_adapter).eval()
    build_index(model, collection_dir, tmp_path / "ix", backbone_spec=str(bb), adapter_path=str(frozen_adapter))
    text_only = open_text_model_for_index(VideoIndex.load(tmp_path / "ix"), backbone=str(bb))
    assert text_only.clip.visual.conv1.weight.is_meta
    torch.testing.assert_close(_text(text_only, SENTENCES, 32), _text(model, SENTENCES, 32))


def test_text_cache_is_lru_and_skips_the_encoder(lora_model) -> None:
    cache = TextCache(2)
    calls = []
    orig = lora_model.encode_text

    def counting(tokens: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape[0])
        return orig(tokens)

    lora_model.encode_text = counting
    try:
        first = encode_texts(lora_model, ["a", "b"], 32, cache, "k")
        again = encode_texts(lora_model, ["b", "a", "c"], 32, cache, "k")  # a, b cached; c evicts the LRU (b)
        assert calls == [2, 1]
        assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0])
        encode_texts(lora_model, ["b"], 32, cache, "k")
        assert calls == [2, 1, 1] and len(cache) == 2
        encode_texts(lora_model, ["a"], 32, cache, "other adapter")  # keys separate adapters
        assert calls[-1] == 1 and cache.hits == 2
    finally:
        del lora_model.encode_text
    torch.testing.assert_close(first, _text(lora_model, ["a", "b"], 32))


def test_quantized_text_tower_stays_close_and_leaves_adapters_alone(tmp_path: Path) -> None:
    clip = vidret.create_backbone("pocket-tiny", seed=0).eval()
    model = vidret.build_model(clip, "lora").eval()
    ref = _text(model, SENTENCES, 32)
    hooked = [m for m in model.clip.text.modules() if type(m).__name__ == "Hook"]
    n = quantize_text_tower(model)
    assert n > 0 and all(type(m).__name__ == "Hook" for m in hooked)
    assert hooked and not any(  # what LoRA hooks (and its branches) stays fp32
        type(m).__module__.startswith("torch.ao") for h in hooked for m in h.modules()
    )
    assert any(type(m).__module__.startswith("torch.ao") for m in model.clip.text.modules())
    got = _text(model, SENTENCES, 32)
    assert F.cosine_similarity(got, ref).min() > 0.98


def test_caption_bank_and_video_to_text(tmp_path: Path, built_index: Path, collection_dir: Path, lora_model) -> None:
    bank = tmp_path / "bank.jsonl"
    bank.write_text('"a red clip"\n{"caption": "something green"}\n\n{"text": "blue water"}\n', encoding="utf-8")
    assert read_caption_bank(bank) == ["a red clip", "something green", "blue water"]
    (tmp_path / "bad.jsonl").write_text("[1]\n", encoding="utf-8")
    with pytest.raises(VidretError, match="bad.jsonl:1"):
        read_caption_bank(tmp_path / "bad.jsonl")
    captions = [f"{c} colour" for c in COLOURS]
    index = VideoIndex.load(built_index)
    ranked = rank_captions(lora_model, collection_dir / "red.mp4", captions, index.settings, k=3)
    # the same scores as comparing the stored video vector with each normalised text embedding
    row = index.row_of("red")
    assert index.vectors is not None and row is not None
    want = F.normalize(_text(lora_model, captions, index.settings.max_words), dim=-1) @ index.vectors[row]
    top = want.topk(3)
    assert [i for i, _ in ranked] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([s for _, s in ranked]), top.values, atol=2e-3, rtol=0)

    txt = tmp_path / "bank.txt"
    txt.write_text("\n".join(captions) + "\n", encoding="utf-8")
    argv = ["search", str(built_index), "--video", str(collection_dir / "red.mp4"), "--captions", str(txt), "-k", "3"]
    buf = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(buf):
        assert main([*argv, "--json"]) == 0
    res = json.loads(buf.getvalue())
    assert [r["caption"] for r in res["results"]] == [captions[i] for i in top.indices.tolist()]
    # 1-based position among the bank's captions (blank lines are skipped, so not a file line number)
    assert [r["position"] for r in res["results"]] == [i + 1 for i in top.indices.tolist()]


def test_interactive_search_keeps_one_model(
    built_index: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import vidret.retrieval.query as q

    loads = []
    orig = q.open_text_model_for_index
    monkeypatch.setattr(q, "open_text_model_for_index", lambda *a, **kw: loads.append(1) or orig(*a, **kw))
    monkeypatch.setattr("sys.stdin", io.StringIO("red\n\n  a dog catches a frisbee \nred\n"))
    capsys.readouterr()
    assert main(["search", str(built_index), "--interactive", "--json", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["text"] for a in answers] == ["red", "a dog catches a frisbee", "red"] and loads == [1]
    assert answers[0]["results"] == answers[2]["results"]
    assert main(["search", str(built_index), "red", "-k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"] == answers[0]["results"]
    assert main(["search", str(built_index), "red", "--interactive"]) != 0  # a query too: one error line
    assert "--interactive reads the queries from stdin" in capsys.readouterr().err


def test_search_url_asks_a_running_server(built_index: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vidret.retrieval.service import create_app, open_service

    service = open_service([f"col={built_index}"], backbone=BACKBONE)
    try:
        with running_server(create_app(service)) as port:
            url = f"http://127.0.0.1:{port}"
            capsys.readouterr()
            assert main(["search", "--url", url, "red", "-k", "3", "--json"]) == 0
            remote = json.loads(capsys.readouterr().out)
            assert main(["search", str(built_index), "red", "-k", "3", "--json"]) == 0
            local = json.loads(capsys.readouterr().out)
            assert [r["video_id"] for r in remote["results"]] == [r["video_id"] for r in local["results"]]
            assert [r["score"] for r in remote["results"]] == pytest.approx(
                [r["score"] for r in local["results"]], abs=1e-4
            )
            assert main(["search", "--url", url, "nope", "red"]) != 0  # unknown served index: one line
            assert "404" in capsys.readouterr().err
            assert service.text_cache.hits >= 0 and len(service.text_cache) >= 1
            # the served model holds no frozen vision weights
            model = service.bank.use(service.collections["col"].adapter)
            assert model.clip.visual.conv1.weight.is_meta
    finally:
        service.close()
    assert main(["search", "--url", f"http://127.0.0.1:{port}", "red"]) != 0
    assert "cannot reach" in capsys.readouterr().err
