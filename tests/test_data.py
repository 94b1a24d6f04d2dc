"""Data sources: generated corpus, user files pinned by sha256, clear errors, no partial outputs."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from models.config import TextDataConfig
from models.data.sources import load_text, split_text
from models.data.stories import generate_corpus
from models.errors import DataError
from tests.conftest import stage, tiny_params


def test_generated_corpus_is_deterministic_and_seeded() -> None:
    assert generate_corpus(50, 1) == generate_corpus(50, 1)
    assert generate_corpus(50, 1) != generate_corpus(50, 2)
    assert "Question:" in generate_corpus(5, 0)


def test_split_is_a_partition() -> None:
    text = generate_corpus(100, 0)
    train, val = split_text(text, 0.1)
    assert train + val == text and 0.05 < len(val) / len(text) < 0.15


def test_file_source_with_correct_sha(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be\n" * 50)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    text, meta = load_text(TextDataConfig(source="file", path=str(path), sha256=sha), tmp_path)
    assert text.startswith("to be") and meta["sha256"] == sha


def _run_prepare(project, text_cfg: dict):
    raw = tiny_params({"data": {"text": text_cfg}})
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    return stage("stages.prepare", check=False)


def test_missing_file_is_one_clear_error(project) -> None:
    result = _run_prepare(project, {"source": "file", "path": "nowhere/shakespeare.txt",
                                    "sha256": "0" * 64})
    assert result.returncode == 2
    assert "nowhere/shakespeare.txt" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / "data" / "text").exists()


def test_wrong_sha256_is_one_clear_error(project) -> None:
    (project / "c.txt").write_text("hello world\n" * 100)
    result = _run_prepare(project, {"source": "file", "path": "c.txt", "sha256": "a" * 64})
    assert result.returncode == 2
    assert "sha256 mismatch" in result.stderr and "c.txt" in result.stderr
    assert not (project / "data" / "text").exists()


def test_missing_file_with_fallback_makes_the_generated_corpus_and_says_so(tmp_path) -> None:
    cfg = TextDataConfig(source="file", path=str(tmp_path / "absent.txt"), sha256="0" * 64,
                         fallback="generated", stories=50)
    text, meta = load_text(cfg, tmp_path)
    assert text == generate_corpus(50, cfg.seed)
    assert meta["source"] == "generated" and meta["fallback_for"].endswith("absent.txt")


def test_fallback_does_not_excuse_a_wrong_checksum(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("hello world\n" * 100)
    cfg = TextDataConfig(source="file", path=str(path), sha256="a" * 64, fallback="generated")
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_text(cfg, tmp_path)


def test_fallback_applies_to_file_sources_only() -> None:
    with pytest.raises(ValueError, match="data.text.fallback"):
        TextDataConfig(source="generated", fallback="generated")
