"""Pickles read as data: nothing a file names is imported or called unless this module allows it.

Two readers, both built on a restricted :class:`pickle.Unpickler` whose ``find_class`` and
``persistent_load`` only ever return objects defined here:

* :func:`load_plain_pickle` reads plain containers and scalars (MSVD's ``raw-captions.pkl``: a dict of
  lists of lists of str). Protocol 2+ builds those with opcodes; the only globals allowed are ``set`` and
  ``frozenset``. Any other global (``builtins.open``, ``os.system``, a class with ``__reduce__``) is
  refused before it is imported, with a :class:`VidretError` naming the file and the global.
* :func:`torchscript_state_dict` reads a TorchScript archive (OpenAI's CLIP ``.pt`` files) the way
  ``torch.jit.load(path).state_dict()`` would, without TorchScript: the zip is opened with
  :mod:`zipfile`, ``<prefix>/data.pkl`` is unpickled with storages mapped to ``<prefix>/data/<key>``,
  tensors rebuilt by a bounds-checked ``as_strided`` view, and every ``__torch__`` object turned into a
  :class:`ScriptObject` that merely records its pickled state (no scripted ``__setstate__`` ever runs).
  Which attributes are parameters and buffers is read from the ``__parameters__`` / ``__buffers__``
  lists of the class declarations under ``<prefix>/code/``, parsed with :mod:`ast` (never compiled).

Everything is bounded: the number of zip entries, the size of each entry read (declared and actual),
storage bytes against ``numel * itemsize``, tensor views against their storage, module depth and count.
Entry names that are absolute or contain ``..`` make the whole archive refused.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from vidret.errors import VidretError

__all__ = ["ScriptObject", "load_plain_pickle", "torchscript_state_dict"]

MAX_PLAIN_PICKLE_BYTES = 512 << 20  # MSVD's raw-captions.pkl is about 4 MB
MAX_DATA_PKL_BYTES = 256 << 20  # data.pkl holds the module tree and tensor metadata; tensors live in data/
MAX_CODE_FILE_BYTES = 16 << 20  # one class-declaration file under code/
MAX_ZIP_ENTRIES = 200_000
MAX_SCRIPT_CLASSES = 20_000  # distinct __torch__ class names in one data.pkl
MAX_DIMS = 64  # tensor dimensions
MAX_MODULE_DEPTH = 128  # nesting of submodules
MAX_MODULES = 1_000_000  # submodule visits while flattening (shared submodules are visited once per name)
# A view may cover more elements than its storage only through stride-0 dimensions (an expanded tensor);
# beyond this many elements that is refused, so a tiny storage cannot claim a terabyte tensor.
MAX_EXPANDED_NUMEL = 1 << 24

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_DRIVE = re.compile(r"[A-Za-z]:")


class _Refused(Exception):
    """Raised inside the unpickler; the public functions turn it into a VidretError naming the file."""


class _Sealed:
    """Objects the unpickler hands out; a pickle's BUILD opcode must not change their attributes."""

    def __setstate__(self, state: object) -> None:
        raise _Refused(f"the pickle tries to set attributes of a {type(self).__name__.lstrip('_')}")


# ------------------------------------------------------------------------------------------ plain data
class _Call(_Sealed):
    """A callable handed to the pickle for an allowed global (instances, so BUILD cannot touch a function)."""

    def __init__(self, fn: Callable[..., Any]):
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)


def _latin1_bytes(text: Any = None, encoding: Any = None) -> bytes:
    # Protocols 0-2 write bytes as _codecs.encode(str, "latin1") and b"" as bytes(): only those are allowed.
    if text is None and encoding is None:
        return b""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused("it calls _codecs.encode / bytes other than to spell a bytes literal")
    return text.encode("latin1")


class _PlainUnpickler(pickle.Unpickler):
    # Protocol 0-2 pickles name Python 2's module; fix_imports maps it only in the default find_class.
    _ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        **{
            (module, name): cls
            for module in ("builtins", "__builtin__")
            for name, cls in (("set", set), ("frozenset", frozenset))
        },
        ("_codecs", "encode"): _Call(_latin1_bytes),
        ("builtins", "bytes"): _Call(_latin1_bytes),
        ("__builtin__", "bytes"): _Call(_latin1_bytes),
    }

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"it asks for the Python global {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it refers to a persistent object (only plain data is allowed)")


def load_plain_pickle(path: str | os.PathLike[str], what: str = "plain data") -> Any:
    """Unpickle a file that must hold only dicts, lists, tuples, sets, str, bytes, numbers, bools, None.

    Args:
        path: the pickle file.
        what: what the file should hold, for the error messages (e.g. "a dict of caption lists").

    Raises:
        VidretError: the file names any other Python global (nothing is imported or run), refers to
            persistent objects, is larger than :data:`MAX_PLAIN_PICKLE_BYTES`, or is not a valid pickle.
    """
    p = Path(path)
    size = p.stat().st_size
    if size > MAX_PLAIN_PICKLE_BYTES:
        raise VidretError(f"{p}: {size} bytes is too large for {what} (at most {MAX_PLAIN_PICKLE_BYTES})")
    data = p.read_bytes()  # from memory: a lying length opcode cannot make the reader allocate it
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise VidretError(
            f"{p}: refused to unpickle: {e}. This file must hold {what} only, and vidret never imports or "
            "runs code named by a data file; re-download it from the dataset's source"
        ) from None
    except Exception as e:  # a truncated or foreign pickle can raise almost anything
        raise VidretError(f"{p}: cannot read the pickle ({type(e).__name__}: {e}); re-download it") from e


# ------------------------------------------------------------------------------------ archive objects
class ScriptObject:
    """An object of a TorchScript class, as data: its class name and the state its pickle recorded.

    Made by the archive reader for every ``__torch__.*`` global (one subclass per class name). Unlike
    TorchScript it never runs the class's scripted ``__setstate__``: ``state`` is the pickled value as is
    (a dict of attributes for ordinary modules).
    """

    qualified_name: ClassVar[str] = ""
    state: Any = None

    def __setstate__(self, state: Any) -> None:
        if "state" in self.__dict__:
            raise _Refused(f"the pickle sets the state of a {self.qualified_name} object twice")
        self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<ScriptObject {self.qualified_name}>"


@dataclass(frozen=True, eq=False)
class _StorageType(_Sealed):
    name: str  # e.g. "HalfStorage"
    dtype: torch.dtype


@dataclass(frozen=True, eq=False)
class _LazyStorage(_Sealed):
    key: str  # the entry <prefix>/data/<key>; read when a tensor first uses it


class _TensorRef(_Sealed):
    """A rebuilt tensor; wrapped so that the pickle cannot call ``Tensor.__setstate__`` on it."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class _OrderedDict(dict[Any, Any]):
    """``collections.OrderedDict`` as the pickle sees it: a plain dict; BUILD state is kept as data."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise _Refused("the pickle sets a non-dict state on an OrderedDict")
        self.attrs = state


def _ordered_dict(*args: Any) -> _OrderedDict:
    out = _OrderedDict()
    if len(args) > 1 or (args and not isinstance(args[0], (list, tuple))):
        raise _Refused("OrderedDict is called with arguments other than a list of pairs")
    for pair in args[0] if args else ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _Refused("OrderedDict is called with an item that is not a (key, value) pair")
        out[pair[0]] = pair[1]
    return out


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise _Refused(f"tensor {what} must be an int >= 0, got {v!r}"[:200])
    return v


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or len(v) > MAX_DIMS:
        raise _Refused(f"tensor {what} must be a tuple of at most {MAX_DIMS} ints, got {v!r}"[:200])
    return tuple(_int(x, what) for x in v)


# ------------------------------------------------------------------------------------------- archives
def _bad_entry_name(name: str) -> bool:
    return (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or "\x00" in name
        or bool(_DRIVE.match(name))
        or any(part == ".." for part in name.split("/"))
    )


@dataclass(frozen=True)
class _ClassDecl:
    is_module: bool  # declared as `class X(Module)`
    parameters: frozenset[str]
    buffers: frozenset[str]


class _Archive:
    """A checked view of a TorchScript / torch.save zip: its entries by name, bounded reads."""

    def __init__(self, zf: zipfile.ZipFile):
        self._zf = zf
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_ENTRIES:
            raise _Refused(f"the zip has {len(infos)} entries (at most {MAX_ZIP_ENTRIES})")
        self._infos: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if _bad_entry_name(info.filename):
                raise _Refused(f"the zip holds an entry named {info.filename!r} (absolute or with '..')")
            if info.filename in self._infos:
                raise _Refused(f"the zip holds two entries named {info.filename!r}")
            self._infos[info.filename] = info
        pkls = [n for n in self._infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise _Refused(f"expected one <name>/data.pkl entry, found {len(pkls)}")
        self.prefix = pkls[0].removesuffix("data.pkl")
        self.byteorder: str = sys.byteorder
        if self.prefix + "byteorder" in self._infos:
            order = self.read(self.prefix + "byteorder", 16).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise _Refused(f"its byteorder entry says {order!r}, not 'little' or 'big'")
            self.byteorder = order
        self._decls: dict[str, dict[str, _ClassDecl]] = {}

    def has(self, name: str) -> bool:
        return name in self._infos

    def read(self, name: str, limit: int) -> bytes:
        info = self._infos.get(name)
        if info is None:
            raise _Refused(f"the zip has no entry {name!r}")
        if info.file_size > limit:
            raise _Refused(f"entry {name!r} declares {info.file_size} bytes (at most {limit})")
        with self._zf.open(info) as f:
            data = f.read(info.file_size + 1)
        if len(data) != info.file_size:
            raise _Refused(f"entry {name!r} holds {len(data)} bytes but declares {info.file_size}")
        return data

    def storage(self, key: str, dtype: torch.dtype, numel: int) -> Tensor:
        """The 1-D tensor of storage ``key``, whose entry must hold exactly ``numel`` elements."""
        name = f"{self.prefix}data/{key}"
        info = self._infos.get(name)
        if info is None:
            raise _Refused(f"the pickle refers to storage {key!r} but the zip has no entry {name!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        if info.file_size != nbytes:
            raise _Refused(
                f"storage {name!r} holds {info.file_size} bytes but the pickle declares {numel} {dtype} "
                f"elements ({nbytes} bytes)"
            )
        if info.compress_type != zipfile.ZIP_STORED:  # torch stores tensors uncompressed; no zip bombs
            raise _Refused(f"storage {name!r} is compressed; tensor data in these archives is stored as is")
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        with self._zf.open(info) as f:
            data = f.read(nbytes)
            extra = f.read(1)  # reaching the end makes zipfile check the CRC
        if len(data) != nbytes or extra:
            raise _Refused(f"storage {name!r} does not hold the {nbytes} bytes its zip header declares")
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # writable: no warning, no shared bytes
        if self.byteorder != sys.byteorder and itemsize > 1:
            flat = flat.view(-1, itemsize).flip(1).reshape(-1)  # [numel, itemsize]: swap bytes per element
        return flat.view(dtype)

    def declaration(self, qualified_name: str) -> _ClassDecl | None:
        """The class declared under ``code/`` for a ``__torch__`` name, or None when there is none."""
        module, _, cls = qualified_name.rpartition(".")
        file = f"{self.prefix}code/{module.replace('.', '/')}.py"
        if file not in self._decls:
            self._decls[file] = self._parse(file) if self.has(file) else {}
        return self._decls[file].get(cls)

    def _parse(self, file: str) -> dict[str, _ClassDecl]:
        try:
            tree = ast.parse(self.read(file, MAX_CODE_FILE_BYTES).decode("utf-8"), filename=file)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # parsed only, never compiled
            raise _Refused(f"cannot parse the class declarations in {file!r} ({type(e).__name__})") from None
        out: dict[str, _ClassDecl] = {}
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            lists: dict[str, frozenset[str]] = {}
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and stmt.targets[0].id in ("__parameters__", "__buffers__")
                    and isinstance(stmt.value, (ast.List, ast.Tuple))
                ):
                    names = [e.value for e in stmt.value.elts if isinstance(e, ast.Constant)]
                    lists[stmt.targets[0].id] = frozenset(n for n in names if isinstance(n, str))
            is_module = any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases)
            out[node.name] = _ClassDecl(
                is_module, lists.get("__parameters__", frozenset()), lists.get("__buffers__", frozenset())
            )
        return out


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl``: tensors from the archive's storages, ``__torch__`` objects as ScriptObjects."""

    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._storages: dict[str, tuple[torch.dtype, int, Tensor | None]] = {}
        self._classes: dict[str, type[ScriptObject]] = {}
        self._globals: dict[tuple[str, str], object] = {
            ("torch._utils", "_rebuild_tensor_v2"): _Call(self._rebuild_tensor),
            ("torch._utils", "_rebuild_parameter"): _Call(self._rebuild_parameter),
            ("collections", "OrderedDict"): _Call(_ordered_dict),
        }
        for name, dtype in _STORAGE_DTYPES.items():
            self._globals["torch", name] = _StorageType(name, dtype)

    def find_class(self, module: str, name: str) -> Any:
        found = self._globals.get((module, name))
        if found is not None:
            return found
        if module == "__torch__" or module.startswith("__torch__."):
            return self._script_class(module, name)
        raise _Refused(f"it asks for the Python global {module}.{name}")

    def _script_class(self, module: str, name: str) -> type[ScriptObject]:
        qualified = f"{module}.{name}"
        cls = self._classes.get(qualified)
        if cls is None:
            if not all(part.isidentifier() for part in qualified.split(".")):
                raise _Refused(f"it names a TorchScript class {qualified!r} that is not a dotted identifier"[:200])
            if len(self._classes) >= MAX_SCRIPT_CLASSES:
                raise _Refused(f"it names more than {MAX_SCRIPT_CLASSES} TorchScript classes")
            cls = type(name, (ScriptObject,), {"qualified_name": qualified, "__module__": __name__})
            self._classes[qualified] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"unsupported persistent id {pid!r}"[:200])
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise _Refused(f"persistent id {pid!r} does not name a storage type"[:200])
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise _Refused(f"storage key {key!r} is not a short name of letters, digits and _"[:200])
        numel = _int(numel, "storage size")
        known = self._storages.setdefault(key, (kind.dtype, numel, None))
        if known[:2] != (kind.dtype, numel):
            raise _Refused(f"storage {key!r} is declared twice, as {known[:2]} and {(kind.dtype, numel)}")
        return _LazyStorage(key)

    def storage_tensor(self, ref: _LazyStorage) -> Tensor:
        dtype, numel, flat = self._storages[ref.key]
        if flat is None:  # read on first use, once
            flat = self._archive.storage(ref.key, dtype, numel)
            self._storages[ref.key] = (dtype, numel, flat)
        return flat

    def _rebuild_tensor(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _TensorRef:
        if not isinstance(storage, _LazyStorage):
            raise _Refused("a tensor is rebuilt from something that is not one of the archive's storages")
        offset, shape, strides = _int(storage_offset, "offset"), _ints(size, "size"), _ints(stride, "stride")
        if len(shape) != len(strides):
            raise _Refused(f"tensor size {shape} and stride {strides} differ in length")
        if type(requires_grad) is not bool or (backward_hooks is not None and not isinstance(backward_hooks, dict)):
            raise _Refused("tensor requires_grad / backward hooks are not a bool / dict")
        if backward_hooks:
            raise _Refused("a tensor carries backward hooks (code), which vidret never restores")
        flat = self.storage_tensor(storage)
        numel = 1
        for n in shape:
            numel *= n
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides)) if numel else offset - 1
        if last >= flat.numel() or (numel > flat.numel() and numel > MAX_EXPANDED_NUMEL):
            raise _Refused(
                f"a tensor of size {shape}, stride {strides}, offset {offset} does not fit in its storage of "
                f"{flat.numel()} elements"
            )
        return _TensorRef(flat.as_strided(shape, strides, offset))

    def _rebuild_parameter(self, data: Any, requires_grad: Any, backward_hooks: Any) -> _TensorRef:
        if not isinstance(data, _TensorRef):
            raise _Refused("a parameter is rebuilt from something that is not a tensor")
        if backward_hooks:
            raise _Refused("a parameter carries backward hooks (code), which vidret never restores")
        return data


# -------------------------------------------------------------------------------------- state dicts
class _Flattener:
    """Parameters and buffers of a module tree of ScriptObjects, named as ``Module.state_dict()`` names them."""

    def __init__(self, archive: _Archive):
        self._archive = archive
        self._visits = 0
        self.out: dict[str, Tensor] = {}

    def _decl(self, obj: object) -> _ClassDecl | None:
        return self._archive.declaration(obj.qualified_name) if isinstance(obj, ScriptObject) else None

    def module(self, obj: ScriptObject, prefix: str, stack: tuple[int, ...]) -> None:
        self._visits += 1
        if len(stack) > MAX_MODULE_DEPTH or self._visits > MAX_MODULES:
            raise _Refused(f"the module tree is deeper than {MAX_MODULE_DEPTH} or has over {MAX_MODULES} modules")
        where = f"module {prefix.rstrip('.') or '<root>'} ({obj.qualified_name})"
        decl = self._decl(obj)
        if decl is None or not decl.is_module:
            raise _Refused(f"{where} has no `class ...(Module)` declaration under {self._archive.prefix}code/")
        state = obj.state
        if not isinstance(state, dict):
            raise _Refused(
                f"{where} has no attribute dict: its state is restored by a scripted __setstate__ (code), "
                "which vidret never runs"
            )
        params: list[tuple[str, Any]] = []
        buffers: list[tuple[str, Any]] = []
        children: list[tuple[str, ScriptObject]] = []
        for name, value in state.items():
            if not isinstance(name, str):
                raise _Refused(f"{where} has an attribute named {name!r}, not a string"[:200])
            if name in decl.parameters:
                params.append((name, value))
            elif name in decl.buffers:
                buffers.append((name, value))
            elif isinstance(value, ScriptObject) and (d := self._decl(value)) is not None and d.is_module:
                children.append((name, value))
        for name, value in params + buffers:  # nn.Module order: parameters, buffers, then submodules
            if isinstance(value, _TensorRef):
                self.out[prefix + name] = value.tensor
            elif value is not None:  # None: an absent optional parameter (bias=False), as in state_dict()
                raise _Refused(f"{where}: {name} is declared a parameter/buffer but holds a {type(value).__name__}")
        for name, child in children:
            if id(child) in stack:
                raise _Refused(f"{where}: submodule {name} contains itself")
            self.module(child, f"{prefix}{name}.", (*stack, id(child)))


def torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict ``torch.jit.load(path).state_dict()`` gives, read as data without TorchScript.

    Tensors keep their stored dtype and views (tensors sharing a storage share memory), on the CPU.

    Raises:
        VidretError: not a zip, a corrupt or truncated archive, an entry name that is absolute or holds
            ``..``, sizes that disagree, a global other than tensor rebuilding / ``OrderedDict`` /
            storage types / ``__torch__`` classes, or a module whose state is restored by scripted code.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            archive = _Archive(zf)
            data = archive.read(archive.prefix + "data.pkl", MAX_DATA_PKL_BYTES)
            root = _ArchiveUnpickler(data, archive).load()
            if not isinstance(root, ScriptObject):
                raise _Refused(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
            flat = _Flattener(archive)
            flat.module(root, "", (id(root),))
            return flat.out
    except _Refused as e:
        raise VidretError(
            f"{p}: refused to read this TorchScript archive: {e}. vidret reads archives as data and never "
            "runs or imports what they name; if the file is from a source you trust, convert it elsewhere "
            "with torch.jit.load(path).state_dict() and save that with safetensors"
        ) from None
    except VidretError:
        raise
    except Exception as e:  # zipfile / pickle / torch errors on a damaged file
        raise VidretError(
            f"cannot read {p}: the archive is corrupt or truncated ({type(e).__name__}: {e}). "
            "Download or convert it again"
        ) from e
