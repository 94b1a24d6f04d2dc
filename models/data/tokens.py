"""Tokenizers (byte-level BPE via ``tokenizers``, characters, or words) and uint16 token arrays.

Token arrays are nanoGPT-style flat ``.bin`` files of uint16, read by memory map, so a run reads
random windows without loading the corpus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models import io


class Codec(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharCodec:
    """Character vocabulary from the training text; index 0 stands for unseen characters."""

    def __init__(self, chars: list[str]) -> None:
        self.chars = ["\0"] + [c for c in chars if c != "\0"]
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def train(cls, text: str) -> CharCodec:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, 0) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def save(self, path: Path) -> None:
        io.write_json(path, {"kind": "char", "chars": self.chars[1:]})


class WordCodec:
    """Word vocabulary (runs of letters, runs of digits, single other characters) from the
    training text; index 0 stands for unseen words, and decoding joins words with spaces. For
    short templated texts (the bridge study's word problems), where every number and name is one
    token and the vocabulary differs from a character model's."""

    SPLIT = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")

    def __init__(self, words: list[str]) -> None:
        self.words = ["<unk>"] + [w for w in words if w != "<unk>"]
        self.index = {w: i for i, w in enumerate(self.words)}
        self.vocab_size = len(self.words)

    @classmethod
    def train(cls, text: str) -> WordCodec:
        return cls(sorted(set(cls.SPLIT.findall(text))))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, 0) for w in self.SPLIT.findall(text)]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)

    def save(self, path: Path) -> None:
        io.write_json(path, {"kind": "word", "words": self.words[1:]})


class BPECodec:
    """Byte-level BPE (GPT-2 style pre-tokenisation); every byte sequence round-trips."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPECodec:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_chunks(text), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return [i for enc in self.tokenizer.encode_batch(list(_chunks(text))) for i in enc.ids]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def save(self, path: Path) -> None:
        io.write_text(path, self.tokenizer.to_str())


def train_codec(kind: str, text: str, vocab_size: int) -> CharCodec | BPECodec:
    return CharCodec.train(text) if kind == "char" else BPECodec.train(text, vocab_size)


def load_codec(path: Path) -> CharCodec | WordCodec | BPECodec:
    payload = json.loads(path.read_text(encoding="utf-8"))
    if payload.get("kind") == "char":
        return CharCodec(payload["chars"])
    if payload.get("kind") == "word":
        return WordCodec(payload["words"])
    return BPECodec(Tokenizer.from_str(path.read_text(encoding="utf-8")))


def _chunks(text: str, size: int = 1 << 16) -> list[str]:
    """Split on paragraph boundaries near ``size`` characters, so encoding parallelises and
    concatenating the chunks gives back the text exactly."""
    out, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def write_tokens(path: Path, ids: list[int]) -> None:
    arr = np.asarray(ids, dtype=np.uint16)
    io.write_bytes(path, arr.tobytes())


def read_tokens(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


class TokenStream:
    """Random (x, y) windows from a token array; its position is a generator state (checkpointed)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int) -> None:
        if len(tokens) <= block_size + 1:
            raise ValueError(f"token array of length {len(tokens)} is shorter than block_size "
                             f"{block_size} + 1")
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.block_size
        starts = torch.randint(len(self.tokens) - t - 1, (self.batch_size,),
                               generator=self.generator)
        rows = [np.asarray(self.tokens[s: s + t + 1], dtype=np.int64) for s in starts.tolist()]
        block = torch.from_numpy(np.stack(rows))
        return block[:, :-1].to(device), block[:, 1:].to(device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
