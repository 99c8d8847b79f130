"""OpenAI CLIP's byte-level BPE tokenizer, reimplemented to give the same ids as the reference.

The reference (OpenAI ``clip/simple_tokenizer.py``, copied unchanged by open_clip) is the ground truth:
the same text cleaning (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, lowercasing),
the same pre-tokenization regex (including its ``IGNORECASE`` flag), the same byte-to-unicode table and
the same merge order, read from the same ``bpe_simple_vocab_16e6.txt.gz``.

Where HF ``transformers.CLIPTokenizer`` (v5, fast only) differs, we follow OpenAI, because the pretrained
text towers were trained on OpenAI's ids:

* HF does not run ftfy or ``html.unescape``: ``"&amp;"``, curly quotes, ligatures and fullwidth letters give
  other ids there.
* HF lowercases with the tokenizers library, which gives ``"ΟΔΟΣ"`` no final sigma; Python's ``lower()``
  (OpenAI, here) gives ``"οδος"``.
* HF's pre-tokenizer regex has no ``IGNORECASE``, so ``"'ſ"`` (long s) is one contraction pre-token here,
  as in OpenAI, and two there.
* HF applies NFC after cleaning; OpenAI normalizes inside ``ftfy.fix_text`` only, so a decomposed accent
  produced by the later ``html.unescape`` stays decomposed here (``"<b>e&#769;</b>"``: ftfy leaves entities
  alone in text containing ``<``).
* ``decode`` drops the ``</w>`` markers as OpenAI does, then strips the trailing space OpenAI leaves.

Usage::

    ids = tokenize(["a cat", "a dog"])  # LongTensor [2, 77]: SOT, ids..., EOT, zeros
"""

from __future__ import annotations

import functools
import gzip
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

from vidret.errors import VidretError

__all__ = [
    "DEFAULT_VOCAB_PATH",
    "EOT_TOKEN",
    "SOT_TOKEN",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
    "default_tokenizer",
    "export_hf_vocab",
    "tokenize",
]

DEFAULT_VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
_END_OF_WORD = "</w>"
# OpenAI uses only the first 49152 - 256 - 2 merges of the file, so that 256 byte tokens, 256 byte+</w>
# tokens, the merges and 2 special tokens make a vocabulary of 49408.
_NUM_MERGES = 49152 - 256 - 2
_VOCAB_SIZE = 49408
# IGNORECASE is part of the reference: text is lowercased already, but it still lets "'ſ" match "'s".
_PRE_TOKENIZE = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
# Bounds the BPE cache so a long-running service fed arbitrary queries cannot grow it without limit.
_CACHE_LIMIT = 200_000


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP table from each byte to a printable unicode character.

    BPE works on strings, so every byte needs a visible stand-in: printable Latin-1 bytes map to
    themselves, the other 68 (controls, space, soft hyphen...) to code points 256, 257, ... in byte order.

    Returns:
        A dict of all 256 bytes to distinct one-character strings.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """OpenAI CLIP's text cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase.

    Args:
        text: Raw caption or query.

    Returns:
        The cleaned text the regex pre-tokenizer sees.
    """
    text = ftfy.fix_text(text)
    # Twice, because web captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text)).strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise VidretError(
            f"BPE vocabulary not found at {path}; reinstall vidret (the file ships with the package) "
            "or pass the path of bpe_simple_vocab_16e6.txt.gz"
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise VidretError(f"cannot read BPE vocabulary {path}: {e}; expected a gzip text file") from e
    # Line 0 is a version header; the rest are "left right" merges in priority order.
    body = lines[1 : _NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in body]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise VidretError(
            f"{path} is not a CLIP BPE vocabulary: expected {_NUM_MERGES} 'left right' merge lines "
            "after the header; use bpe_simple_vocab_16e6.txt.gz"
        )
    return [(m[0], m[1]) for m in merges]


class Tokenizer:
    """OpenAI CLIP BPE tokenizer (lowercased, 49408 ids).

    Args:
        bpe_path: The gzipped merges file; defaults to the copy shipped with vidret.
    """

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        self.bpe_path = Path(bpe_path) if bpe_path is not None else DEFAULT_VOCAB_PATH
        merges = _read_merges(self.bpe_path)
        self._byte_encoder = bytes_to_unicode()
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + _END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        if len(set(vocab)) != _VOCAB_SIZE:
            raise VidretError(f"{self.bpe_path} gives {len(set(vocab))} distinct tokens, expected {_VOCAB_SIZE}")
        self._vocab: list[str] = vocab
        self._encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self._ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, tuple[str, ...]] = {}
        self.sot_token_id: int = self._encoder[SOT_TOKEN]
        self.eot_token_id: int = self._encoder[EOT_TOKEN]
        self._specials = {SOT_TOKEN: self.sot_token_id, EOT_TOKEN: self.eot_token_id}

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408)."""
        return len(self._vocab)

    @property
    def vocab(self) -> list[str]:
        """Token strings in id order (a copy), in the byte-to-unicode alphabet."""
        return list(self._vocab)

    @property
    def merges(self) -> list[tuple[str, str]]:
        """The merges in priority order (a copy)."""
        return sorted(self._ranks, key=self._ranks.__getitem__)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Split one pre-token (already in the byte alphabet) into vocabulary tokens."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self._ranks
        while len(parts) > 1:
            pairs = zip(parts[:-1], parts[1:])
            best = min(pairs, key=lambda p: ranks.get(p, _NUM_MERGES))
            if best not in ranks:
                break
            # Merge every occurrence of the best pair, scanning left to right without overlaps
            # ("a a a" with merge "a a" gives "aa a"), as the reference does.
            left, right = best
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == left and parts[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        result = tuple(parts)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without SOT/EOT.

        Args:
            text: Any string; it is cleaned as OpenAI CLIP does (see :func:`clean_text`).

        Returns:
            The BPE ids. ``"<|startoftext|>"`` / ``"<|endoftext|>"`` written in the text become the special
            ids, as in the reference.
        """
        ids: list[int] = []
        for piece in _PRE_TOKENIZE.findall(clean_text(text)):
            special = self._specials.get(piece)
            if special is not None:
                ids.append(special)
                continue
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self._encoder[tok] for tok in self._bpe(word))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids: the cleaned, lowercased text with words and punctuation space-separated.

        Args:
            ids: Token ids, e.g. a :meth:`encode` result. For a :func:`tokenize` row, pass the ids up to the
                EOT (the zero padding is token ``"!"``).
            skip_special_tokens: Drop SOT/EOT ids instead of writing their strings.

        Returns:
            The decoded text; invalid UTF-8 (a cut multi-byte character) becomes U+FFFD.
        """
        tokens: list[str] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._vocab):
                raise VidretError(f"token id {i} is out of range [0, {len(self._vocab)}); not a CLIP BPE id")
            if skip_special_tokens and i in (self.sot_token_id, self.eot_token_id):
                continue
            tokens.append(self._vocab[i])
        data = bytes(self._byte_decoder[c] for c in "".join(tokens))
        text = data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")
        # The reference leaves a trailing space after the last word; it carries no information.
        return text.rstrip(" ")

    def tokenize(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
        """See :func:`tokenize`; this tokenizer's vocabulary instead of the default one."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise VidretError(f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}")
        for n, text in enumerate(texts):
            if not isinstance(text, str):
                raise VidretError(
                    f"texts[{n}] is a {type(text).__name__}; tokenize takes a string or a list of strings"
                )
        out = torch.zeros(len(texts), context_length, dtype=torch.long)  # [N, L]
        for n, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    shown = text if len(text) <= 80 else text[:77] + "..."
                    raise VidretError(
                        f"text {n} ({shown!r}) is {len(ids)} tokens with SOT/EOT, more than context_length="
                        f"{context_length}; shorten it or pass truncate=True"
                    )
                # Cut, then put EOT back last: the text tower pools at the EOT position.
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[n, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
    """The shared tokenizer over the shipped vocabulary, built on first use."""
    return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = True) -> torch.Tensor:
    """Token id rows for CLIP's text tower: ``[SOT] + ids + [EOT]``, zero-padded.

    Args:
        texts: One string or a sequence of strings.
        context_length: Row length L (77 for the OpenAI models).
        truncate: Cut long texts to L ids keeping EOT last; if False, a long text raises.

    Returns:
        LongTensor [N, L] (N = 1 for a single string).

    Raises:
        VidretError: A text is too long and ``truncate`` is False, a non-string text, or L < 2.
    """
    return default_tokenizer().tokenize(texts, context_length=context_length, truncate=truncate)


def export_hf_vocab(directory: str | Path, bpe_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write HF-style ``vocab.json`` and ``merges.txt`` for the same vocabulary.

    ``transformers.CLIPTokenizer.from_pretrained(directory)`` then gives the same BPE; note that its
    text cleaning differs (see the module docstring).

    Args:
        directory: Output folder, created if missing.
        bpe_path: The gzipped merges file; defaults to the shipped one.

    Returns:
        The paths of ``vocab.json`` and ``merges.txt``.
    """
    tok = default_tokenizer() if bpe_path is None else Tokenizer(bpe_path)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = out / "vocab.json"
    merges_path = out / "merges.txt"
    vocab = {t: i for i, t in enumerate(tok.vocab)}
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in tok.merges)]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path
