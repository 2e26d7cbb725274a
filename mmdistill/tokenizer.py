"""One small tokenizer interface over Hugging Face tokenizers and raw sentencepiece models.

HF-format teachers load with ``AutoTokenizer``. Teachers whose tokenizer is remote code over a
sentencepiece model (HoVLE/InternLM2: ``tokenizer.model`` + ``auto_map`` to a custom class) are
read directly with sentencepiece, so no remote code runs. Both expose the same methods.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .errors import CheckpointError


class Tokenizer:
    """Common interface. ``encode`` adds BOS when the tokenizer is configured to."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    def __init__(self, inner):
        self.inner = inner
        self.bos_token_id = inner.bos_token_id
        self.eos_token_id = inner.eos_token_id
        self.pad_token_id = inner.pad_token_id
        self.chat_template = getattr(inner, "chat_template", None)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        idx = self.inner.convert_tokens_to_ids(token)
        return None if idx is None or idx == self.inner.unk_token_id else idx

    @property
    def vocab_size(self) -> int:
        return len(self.inner)


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece model plus the special-token settings of ``tokenizer_config.json``."""

    def __init__(self, model_file: Path, config: dict):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.chat_template = config.get("chat_template")

        def special(name: str, default: int | None) -> int | None:
            token = config.get(name)
            if isinstance(token, dict):
                token = token.get("content")
            if token is None:
                return default
            idx = self.sp.piece_to_id(token)
            return None if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx) else idx

        self.bos_token_id = special(
            "bos_token", self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        )
        self.eos_token_id = special(
            "eos_token", self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        )
        self.pad_token_id = special(
            "pad_token", self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        )
        # Added tokens beyond the sentencepiece vocabulary (id -> text) from tokenizer_config.
        decoder = config.get("added_tokens_decoder") or {}
        self.added = {
            int(k): v["content"] for k, v in decoder.items() if int(k) >= self.sp.get_piece_size()
        }
        self.added_ids = {v: k for k, v in self.added.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode_with_added(text)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.add_eos and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def _encode_with_added(self, text: str) -> list[int]:
        if not self.added_ids:
            return self.sp.encode(text)
        out: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(tok), tok) for tok in self.added_ids if tok in rest]
            if not hits:
                out.extend(self.sp.encode(rest))
                break
            pos, tok = min(hits)
            if pos:
                out.extend(self.sp.encode(rest[:pos]))
            out.append(self.added_ids[tok])
            rest = rest[pos + len(tok) :]
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        specials = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces, run = [], []
        for i in ids:
            if i in self.added or (skip_special_tokens and i in specials):
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                if i in self.added and not skip_special_tokens:
                    pieces.append(self.added[i])
                continue
            run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def token_to_id(self, token: str) -> int | None:
        if token in self.added_ids:
            return self.added_ids[token]
        idx = self.sp.piece_to_id(token)
        return None if idx == self.sp.unk_id() and token != self.sp.id_to_piece(idx) else idx

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.added)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer stored in a teacher or student directory."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    remote = "auto_map" in config
    if (directory / "tokenizer.json").exists() or (
        config and not remote and not (directory / "tokenizer.model").exists()
    ):
        from transformers import AutoTokenizer
        from transformers.utils import logging

        # A student's config.json has model_type "mmdistill", unknown to transformers, which
        # would warn although the tokenizer files themselves are complete.
        level = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            return HFTokenizer(AutoTokenizer.from_pretrained(str(directory)))
        except Exception as exc:
            raise CheckpointError(f"cannot load the tokenizer in {directory}: {exc}") from exc
        finally:
            logging.set_verbosity(level)
    if (directory / "tokenizer.model").exists():
        return SentencePieceTokenizer(directory / "tokenizer.model", config)
    raise CheckpointError(f"no tokenizer files in {directory}")


def add_tokens_to_files(directory: str | Path, tokens: Sequence[str], first_id: int) -> None:
    """Register ``tokens`` as special tokens with ids ``first_id, first_id + 1, ...`` in the
    tokenizer files of ``directory`` (``tokenizer_config.json`` and, if present,
    ``tokenizer.json``), so that ``load_tokenizer`` encodes and decodes them as single ids."""
    directory = Path(directory)
    entries = {
        str(first_id + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(tokens)
    }
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    config.setdefault("added_tokens_decoder", {}).update(entries)
    config_path.write_text(json.dumps(config, indent=2))
    fast_path = directory / "tokenizer.json"
    if fast_path.exists():
        fast = json.loads(fast_path.read_text())
        fast.setdefault("added_tokens", []).extend({"id": int(k), **v} for k, v in entries.items())
        fast_path.write_text(json.dumps(fast))
