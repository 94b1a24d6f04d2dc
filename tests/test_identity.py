"""Run identity on meaning and per row: what an edit to the code retrains, stated on a copy of the
project's own sources, and the checkpoint sidecar that lets validity be read without loading."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from models.identity import ROOT, code_hash, source_digest, stage_code
from models.training import checkpoint

KINDS = ("bp", "bptt", "ep")


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of models/ and stages/ to edit (the identity is computed from files under a root)."""
    for pkg in ("models", "stages"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _row_hashes(root: Path) -> dict[str, str]:
    """The train stage's code identity of an eqt_lm row of each kind, under ``root``."""
    return {k: code_hash(stage_code("train", "eqt_lm", (k,), root), root) for k in KINDS}


def test_docstring_and_comment_edits_in_ep_retrain_nothing(tree: Path) -> None:
    before = _row_hashes(tree)
    ep = tree / "models/eqt/ep.py"
    text = ep.read_text()
    edited = text.replace('"""', '"""Edited. ', 1)  # the module docstring
    edited = re.sub(r"(def \w+\(.*?\).*?:\n\s+)\"\"\"", r'\1"""Also edited: ', edited, count=3,
                    flags=re.S)  # function docstrings
    edited = edited.replace("\nimport math\n", "\n# a new comment\nimport math  # and another\n\n")
    assert edited != text
    ep.write_text(edited)
    assert _row_hashes(tree) == before


def test_a_code_edit_retrains_the_rows_that_run_it_only(tree: Path) -> None:
    before = _row_hashes(tree)
    ep = tree / "models/eqt/ep.py"
    ep.write_text(ep.read_text() + "\n\nEDITED = 1\n")  # what runs changed
    after = _row_hashes(tree)
    assert after["ep"] != before["ep"]
    assert after["bptt"] != before["bptt"]  # the BPTT row imports EP's contrast (fast path)
    assert after["bp"] == before["bp"]  # the BP transformer runs no equilibrium code
    bp = tree / "models/studies/eqt_lm/bp.py"
    bp.write_text(bp.read_text() + "\n\nEDITED = 1\n")
    again = _row_hashes(tree)
    assert again["bp"] != after["bp"] and again["ep"] == after["ep"]
    assert again["bptt"] == after["bptt"]


def test_source_digest_ignores_layout_but_not_strings(tmp_path: Path) -> None:
    a, b, c = (tmp_path / f"{n}.py" for n in "abc")
    a.write_text('def f(x):\n    """Doc."""\n    return x + "s"\n')
    b.write_text('def f(x):  # comment\n\n    return (x +\n            "s")\n')
    c.write_text('def f(x):\n    """Doc."""\n    return x + "t"\n')  # a string that runs
    assert source_digest(a) == source_digest(b) != source_digest(c)


def test_checkpoint_validity_is_read_from_its_sidecar(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "seg0000.pt"
    ident = {"config": "abc", "code": "def"}
    checkpoint.save(path, step=10, identity=ident, trainer={"w": torch.zeros(3)}, rng={})
    assert checkpoint.sidecar(path).is_file()

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("is_valid loaded the checkpoint")

    monkeypatch.setattr(torch, "load", no_load)
    assert checkpoint.is_valid(path, identity=ident, step=10)
    assert not checkpoint.is_valid(path, identity={**ident, "code": "xyz"}, step=10)
    assert not checkpoint.is_valid(path, identity=ident, step=20)
    monkeypatch.undo()
    checkpoint.sidecar(path).unlink()  # a checkpoint from before sidecars: loaded instead
    assert checkpoint.is_valid(path, identity=ident, step=10)
    path.unlink()  # a sidecar without its checkpoint is not a finished segment
    checkpoint.save(path, step=10, identity=ident, trainer={}, rng={})
    path.unlink()
    assert not checkpoint.is_valid(path, identity=ident, step=10)
