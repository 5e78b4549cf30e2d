"""Tokenizers: the byte tokenizer of the presets, or a Hugging Face model folder's own tokenizer.

A model named by a preset or a config JSON file trains on raw UTF-8 bytes (vocab 256).
A folder written by `save_pretrained` must hold its tokenizer; it is loaded offline
with `AutoTokenizer` (nothing is downloaded).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fedswarm.data import VOCAB_SIZE
from fedswarm.errors import BadInput, why

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


class ByteTokenizer:
    """UTF-8 bytes as token ids (the presets' vocabulary: 256 ids, no special tokens)."""

    vocab_size = VOCAB_SIZE
    eos_token_id = None
    chat_template = None
    is_bytes = True

    def __len__(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return "bytes-v1"


def is_hf_folder(model: str) -> bool:
    """A folder holding config.json (a `save_pretrained` checkpoint, or a config-only folder)."""
    return os.path.isdir(model) and os.path.isfile(os.path.join(model, "config.json"))


def has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name))
               for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"))


def load_tokenizer(model: str):
    """The tokenizer that goes with `model`: ByteTokenizer for presets and config files, else the folder's own.

    Raises BadInput (a ValueError) for a folder without a tokenizer or with a file that does not load."""
    if not is_hf_folder(model):
        return ByteTokenizer()
    if not has_tokenizer(model):
        raise BadInput(f"model folder {model} has no tokenizer (tokenizer.json / tokenizer_config.json): save it "
                       f"there with tokenizer.save_pretrained({model!r}), or pass a preset or a config JSON file "
                       f"for a byte-level model")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers and tokenizers (Rust) raise many types for a bad file
        raise BadInput(tokenizer_problem(model, err)) from None
    tok.is_bytes = False
    tok.fingerprint = lambda: folder_fingerprint(model)
    return tok


_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "chat_template.json")


def json_problem(path: Path) -> str | None:
    """What is wrong with a JSON file (None: it parses)."""
    try:
        json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        return f"{path} is not a JSON file (byte {err.start} is not UTF-8 text)"
    except json.JSONDecodeError as err:
        return f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
    except OSError as err:
        return f"{path} cannot be read ({err.strerror or err})"
    return None


def tokenizer_problem(folder: str, err: BaseException) -> str:
    """One line naming the file of `folder` that made loading its tokenizer fail, and what to do."""
    fix = f"save the tokenizer again with tokenizer.save_pretrained({folder!r})"
    for name in _JSON_FILES:
        path = Path(folder) / name
        if path.is_file() and (problem := json_problem(path)):
            return f"{problem}: {'save the model again with save_pretrained' if name == 'config.json' else fix}"
    return f"cannot load the tokenizer in {folder} ({why(err)}): {fix}"


def folder_fingerprint(folder: str) -> str:
    """sha256 over the tokenizer files of a model folder: the key of its tokenized data."""
    h = hashlib.sha256(b"hf-tokenizer-v1")
    for name in _TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:32]


def eos_id(tokenizer) -> int | None:
    """The id that ends a document, if the tokenizer has one."""
    return getattr(tokenizer, "eos_token_id", None)


def byte_hf_tokenizer():
    """The byte tokenizer as a Hugging Face tokenizer (id = byte value), so preset exports load with AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the ByteLevel pre-tokenizer applies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
