"""Issue 13 rows 2 and 3: no code runs from a file a user is handed.

Every crafted file here would create a marker file if anything in it ran. The tests check that the marker
never appears and that the load fails with one VidretError naming the file (or loads data only). Where it
is cheap, a control runs the same payload where code does run (``torch.jit.load`` / ``pickle.loads`` on
the test's own file) and sees the marker appear, so a test cannot pass because its payload is a dud.
"""

from __future__ import annotations

import collections
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.backbone.torchscript import script_tree
from vidret.backbone.clip import CLIP, get_config
from vidret.backbone.convert import to_openai
from vidret.backbone.pretrained import load_backbone, load_checkpoint
from vidret.data.converters import convert
from vidret.errors import VidretError
from vidret.safe_pickle import load_plain_pickle, torchscript_state_dict

# The tests build TorchScript archives to read; torch 2.x marks torch.jit.script/load as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------- payloads
class _OpenMarker:
    """Unpickling calls ``open(path, "w")``: the file appears."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


class _ExecMarker(_OpenMarker):
    """Unpickling calls ``exec`` on source that creates the file."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.path!r}, 'w').close()",))


class _FileWriter(nn.Module):
    """A module whose scripted ``__setstate__`` creates (or overwrites) ``path`` when TorchScript loads it."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.buf = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: Tensor) -> Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.buf = torch.from_file(self.path, shared=True, size=8, dtype=torch.uint8)
        self.buf.fill_(65)


def _tiny_clip_openai_sd() -> dict[str, Tensor]:
    torch.manual_seed(0)
    sd = {k: v.half() for k, v in to_openai(CLIP(get_config("pocket-tiny")).state_dict()).items()}
    return sd | {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77)}


# ------------------------------------------------------------------ (i) equals torch.jit.load on benign
class _Leaf(nn.Module):
    def __init__(self, shared: nn.Parameter):
        super().__init__()
        base = torch.arange(24, dtype=torch.float16)
        self.register_buffer("offset_view", base[3:11])  # a view at an offset into a shared storage
        self.register_buffer("strided_view", base.view(4, 6)[:, 1::2])  # [4, 3], non-contiguous, same storage
        self.weight = nn.Parameter(torch.randn(5, 3).t())  # fp32, transposed strides
        self.shared = shared  # one parameter in two modules
        self.lin = nn.Linear(3, 2, bias=False)  # a None parameter: absent from state_dict
        self.register_buffer("flags", torch.tensor([True, False]))
        self.register_buffer("count", torch.tensor(77))  # 0-d int64, like OpenAI's context_length
        self.register_buffer("empty", torch.empty(0, 4))
        self.register_buffer("bf", torch.randn(3).bfloat16())
        self.register_buffer("scratch", torch.ones(2), persistent=False)  # TorchScript keeps it in state_dict
        self.plain = torch.zeros(3)  # a plain tensor attribute: not in state_dict

    def forward(self, x: Tensor) -> Tensor:
        return x


class _Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Parameter(torch.randn(4))
        self.blocks = nn.ModuleList([_Leaf(shared), _Leaf(shared)])
        self.head = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.alias = self.head  # one submodule under two names

    def forward(self, x: Tensor) -> Tensor:
        return x


def test_safe_reader_equals_torch_jit_load_on_a_benign_archive(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "benign.pt"
    torch.jit.script(_Root()).save(str(path))
    ref = torch.jit.load(str(path), map_location="cpu").state_dict()  # this test's own file: fine to script-load

    got = torchscript_state_dict(path)

    assert list(got) == list(ref)  # names and their order
    for key, want in ref.items():
        have = got[key]
        assert (have.dtype, have.shape, have.stride(), have.storage_offset()) == (
            want.dtype,
            want.shape,
            want.stride(),
            want.storage_offset(),
        ), key
        assert torch.equal(have, want), key
    assert {t.dtype for t in got.values()} >= {torch.float16, torch.float32, torch.bfloat16, torch.bool, torch.int64}
    # views of one storage stay views of one storage
    ptr = got["blocks.0.offset_view"].untyped_storage().data_ptr()
    assert got["blocks.0.strided_view"].untyped_storage().data_ptr() == ptr
    assert got["blocks.1.shared"].data_ptr() == got["blocks.0.shared"].data_ptr()


def test_openai_style_archive_loads_through_the_backbone_loader(tmp_path: Path) -> None:
    sd = _tiny_clip_openai_sd()
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.script(script_tree(sd)).save(str(path))
    ckpt = load_checkpoint(path)
    assert (ckpt.format, ckpt.layout, ckpt.config.name) == ("torchscript", "openai", "pocket-tiny")
    ref = torch.jit.load(str(path)).state_dict()
    assert torchscript_state_dict(path).keys() == ref.keys() == sd.keys()


# --------------------------------------------------------------- (ii) scripted __setstate__ never runs
def test_scripted_setstate_in_a_backbone_archive_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written-by-the-archive"
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(script_tree(_tiny_clip_openai_sd(), {"payload": _FileWriter(str(marker))})).save(str(path))
    assert not marker.exists()

    with pytest.raises(VidretError, match=r"payload .*scripted __setstate__.*never runs") as info:
        load_backbone(path)
    assert str(path) in str(info.value)
    assert not marker.exists()

    torch.jit.load(str(path))  # control: TorchScript itself runs the payload
    assert marker.read_bytes() == b"A" * 8


# ------------------------------------------------------------------------- (iii) MSVD raw-captions.pkl
def _msvd(tmp_path: Path, captions: object) -> tuple[Path, Path]:
    ann, vids = tmp_path / "ann", tmp_path / "videos"
    ann.mkdir()
    vids.mkdir()
    (vids / "vid1.avi").write_bytes(b"")
    (ann / "train_list.txt").write_text("vid1\n")
    (ann / "raw-captions.pkl").write_bytes(pickle.dumps(captions, protocol=4))
    return ann, vids


@pytest.mark.parametrize(("payload", "global_name"), [(_OpenMarker, "io.open"), (_ExecMarker, "builtins.exec")])
def test_crafted_msvd_pickle_is_refused(tmp_path: Path, payload: type[_OpenMarker], global_name: str) -> None:
    marker = tmp_path / "marker"
    ann, vids = _msvd(tmp_path, {"vid1": [["a", "dog"], payload(marker)]})
    pkl = ann / "raw-captions.pkl"

    with pytest.raises(VidretError, match=rf"refused to unpickle: it asks for the Python global {global_name}") as e:
        convert("msvd", ann, vids, tmp_path / "out")
    assert str(pkl) in str(e.value)
    assert not marker.exists()

    pickle.loads(pkl.read_bytes())  # control: an ordinary unpickler runs it
    assert marker.exists()


def test_benign_msvd_pickle_still_converts(tmp_path: Path) -> None:
    ann, vids = _msvd(tmp_path, {"vid1": [["a", "dog", "runs"], ["a", "puppy"]], "other": [["x"]]})
    report = convert("msvd", ann, vids, tmp_path / "out")
    assert report.splits["train"].rows_kept == 2


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickle_reads_plain_data_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    data = {"a": [["x", "y"], ["z"]], "b": [], "n": (1, -(2**70), 2.5, True, None, b"raw", {1, 2}, frozenset({3}))}
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_plain_pickle(path) == data


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (types.SimpleNamespace(a=1), "types.SimpleNamespace"),
        (torch.zeros(2), "torch._utils._rebuild_tensor_v2"),
    ],
)
def test_plain_pickle_refuses_every_other_global(tmp_path: Path, value: object, refused: str) -> None:
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"k": value}, protocol=2))
    with pytest.raises(VidretError, match=rf"{refused}"):
        load_plain_pickle(path)


def test_plain_pickle_refuses_persistent_ids(tmp_path: Path) -> None:
    class _WithIds(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return "ext" if obj == "x" else None

    path = tmp_path / "data.pkl"
    with path.open("wb") as f:
        _WithIds(f, protocol=2).dump(["x"])
    with pytest.raises(VidretError, match="persistent object"):
        load_plain_pickle(path)


# -------------------------------------------------------------------------- (iv) plain torch.save files
@pytest.mark.parametrize("legacy", [False, True])
def test_crafted_torch_save_backbone_is_refused(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "weights.pt"
    sd: dict[str, object] = dict(to_openai(CLIP(get_config("pocket-tiny")).state_dict()))
    sd["payload"] = _OpenMarker(marker)
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(VidretError, match="never unpickles code"):
        load_backbone(path)
    assert not marker.exists()


# ------------------------------------------------------------- (v) crafted archives: zip and pickle level
class _Storage:
    """A storage in a crafted data.pkl: pickled as the persistent id TorchScript writes."""

    def __init__(self, key: str, numel: int, kind: type = torch.FloatStorage):
        self.key, self.numel, self.kind = key, numel, kind


class _View:
    """A tensor in a crafted data.pkl: pickled as torch._utils._rebuild_tensor_v2(...), as TorchScript does."""

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.args = (storage, offset, size, stride)

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict()))


class _ArchivePickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.numel)
        return None


_CODE = 'class Net(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n  training : bool\n'


def _write_archive(
    path: Path,
    state: dict[str, object],
    storages: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
    *,
    extra: tuple[str, ...] = (),
    compress: bool = False,
) -> None:
    """A TorchScript-shaped zip whose data.pkl is ``__torch__.Net`` with ``state``, written by hand."""
    fake = types.ModuleType("__torch__")
    net = type("Net", (), {"__module__": "__torch__"})
    fake.Net = net  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "__torch__", fake)  # so pickle can name the class as TorchScript does
    obj = net()
    obj.__dict__.update(state)
    buf = __import__("io").BytesIO()
    _ArchivePickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arch/data.pkl", buf.getvalue())
        zf.writestr("arch/code/__torch__.py", _CODE)
        zf.writestr("arch/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("arch/version", "3\n")
        for key, data in storages.items():
            zf.writestr(f"arch/data/{key}", data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        for name in extra:
            zf.writestr(name, b"x")


_FOUR = torch.arange(4, dtype=torch.float32).numpy().tobytes()


def test_hand_written_archive_baseline_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The crafted cases below each change one thing of this valid archive."""
    path = tmp_path / "ok.pt"
    _write_archive(path, {"w": _View(_Storage("0", 4), 1, (3,), (1,)), "training": False}, {"0": _FOUR}, monkeypatch)
    got = torchscript_state_dict(path)
    assert list(got) == ["w"] and torch.equal(got["w"], torch.tensor([1.0, 2.0, 3.0]))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("traversal entry", r"entry named '\.\./\.\./outside\.pt' \(absolute or with '\.\.'\)"),
        ("absolute entry", r"entry named '/tmp/abs\.pt' \(absolute or with '\.\.'\)"),
        ("storage smaller than declared", r"holds 8 bytes but the pickle declares 4 torch\.float32 elements"),
        ("view past its storage", r"does not fit in its storage of 4 elements"),
        ("offset past its storage", r"does not fit in its storage of 4 elements"),
        ("huge expanded view", r"does not fit in its storage of 4 elements"),
        ("negative stride", r"tensor stride must be an int >= 0"),
        ("missing storage", r"the zip has no entry 'arch/data/7'"),
        ("compressed storage", r"storage 'arch/data/0' is compressed"),
        ("foreign storage type", r"it asks for the Python global torch\.Tensor"),
        ("code global", r"it asks for the Python global io\.open"),
    ],
)
def test_crafted_archive_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, message: str) -> None:
    marker = tmp_path / "marker"
    st = _Storage("0", 4)
    w: object = _View(st, 0, (2, 2), (2, 1))
    storages, extra, compress = {"0": _FOUR}, (), False
    if case == "traversal entry":
        extra = ("../../outside.pt",)
    elif case == "absolute entry":
        extra = ("/tmp/abs.pt",)
    elif case == "storage smaller than declared":
        storages = {"0": _FOUR[:8]}
    elif case == "view past its storage":
        w = _View(st, 1, (2, 2), (2, 1))
    elif case == "offset past its storage":
        w = _View(st, 4, (1,), (1,))
    elif case == "huge expanded view":
        w = _View(st, 0, (1 << 40,), (0,))
    elif case == "negative stride":
        w = _View(st, 3, (4,), (-1,))
    elif case == "missing storage":
        w = _View(_Storage("7", 4), 0, (4,), (1,))
    elif case == "compressed storage":
        compress = True
    elif case == "foreign storage type":
        w = _View(_Storage("0", 4, kind=torch.Tensor), 0, (4,), (1,))
    elif case == "code global":
        w = _OpenMarker(marker)
    path = tmp_path / "crafted.pt"
    _write_archive(path, {"w": w, "training": False}, storages, monkeypatch, extra=extra, compress=compress)

    with pytest.raises(VidretError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()


def test_plain_pickle_allows_codecs_encode_only_to_spell_bytes(tmp_path: Path) -> None:
    path = tmp_path / "data.pkl"
    # _codecs.encode("x", "zlib_codec"): a codec call that is not a protocol-2 bytes literal
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x0a\x00\x00\x00zlib_codec\x86R.")
    with pytest.raises(VidretError, match="_codecs.encode / bytes other than to spell a bytes literal"):
        load_plain_pickle(path)
