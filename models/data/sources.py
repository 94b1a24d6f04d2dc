"""Where the text comes from: the generated corpus, a local file, or a URL, pinned by sha256.

Downloading happens only when params name ``source: url``; the default never touches the network.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from models import io
from models.config import TextDataConfig
from models.data.stories import generate_corpus
from models.errors import DataError


def _generated(cfg: TextDataConfig) -> tuple[str, dict[str, str]]:
    return generate_corpus(cfg.stories, cfg.seed), {
        "source": "generated", "stories": str(cfg.stories), "seed": str(cfg.seed)}


def load_text(cfg: TextDataConfig, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """Return the raw corpus and provenance (source, path/url, sha256)."""
    if cfg.source == "generated":
        return _generated(cfg)
    if cfg.source == "file":
        path = Path(cfg.path or "")
        if not path.is_file() and cfg.fallback == "generated":
            print(f"prepare: warning: data.text.path {path} not found; using the generated "
                  f"corpus instead (data.text.fallback: generated). `make corpus` fetches the "
                  "default one.", file=sys.stderr)
            text, meta = _generated(cfg)
            return text, {**meta, "fallback_for": str(path)}
        if not path.is_file():
            raise DataError(f"data.text.path: file not found: {path}")
        _verify(path, cfg.sha256 or "", "data.text.path")
        return _decode(path), {"source": "file", "path": str(path), "sha256": cfg.sha256 or ""}
    path = cache_dir / Path(cfg.url or "").name
    if not (path.is_file() and io.sha256_file(path) == cfg.sha256):
        _download(cfg.url or "", path)
    _verify(path, cfg.sha256 or "", "data.text.url")
    return _decode(path), {"source": "url", "url": cfg.url or "", "sha256": cfg.sha256 or ""}


def _verify(path: Path, expected: str, key: str) -> None:
    actual = io.sha256_file(path)
    if actual != expected:
        raise DataError(f"{key}: sha256 mismatch for {path}: expected {expected}, got {actual}")


def _decode(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, io.atomic_path(dest) as tmp:
            with open(tmp, "wb") as fh:
                shutil.copyfileobj(response, fh)
    except OSError as err:
        raise DataError(f"data.text.url: could not download {url}: {err}") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """nanoGPT-style split: the first (1 - val_fraction) of the text trains, the tail validates."""
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]
