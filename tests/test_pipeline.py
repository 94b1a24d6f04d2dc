"""Run identity end to end, under both front-ends, on the tiny profile.

A code edit that only the LM study imports re-runs exactly that study's calibrate/train/diagnose
and the report (new checkpoint bytes; the other study's files untouched); an edited calibration
file retrains its runs; raising ``steps`` trains only the new segments; ``dvc exp show`` compares
experiments. Two studies keep it quick: ``eqt_lm`` (the LM) and ``rules_lq`` (never imports the
transformer).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import COPIED, ROOT, tool

pytestmark = pytest.mark.slow

STUDIES = ("eqt_lm", "rules_lq")
LM_LINE = ("nn.init.normal_(module.weight, mean=0.0, std=0.02)",
           "nn.init.normal_(module.weight, mean=0.0, std=0.05)")


def _sh(*cmd: str, stdout_only: bool = False) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


@pytest.fixture
def two_study_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project's code with params.yaml naming `profile: tiny`, restricted to STUDIES, and
    its dvc.yaml regenerated for them (by the project's own generator)."""
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (tmp_path / name).write_bytes(src.read_bytes())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["profile"] = "tiny"
    params["studies"] = {k: v for k, v in params["studies"].items() if k in STUDIES}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tiny = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    tiny["studies"] = {k: v for k, v in tiny["studies"].items() if k in STUDIES}
    (tmp_path / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BPFREE_PROFILE", raising=False)
    monkeypatch.delenv("BPFREE_OVERRIDES", raising=False)
    # stage commands say `python -m stages.*` (DVC runs them with the `python` on PATH)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    _sh(sys.executable, "-m", "stages.dag")
    return tmp_path


def _state(study: str) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file a study's stages wrote."""
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(Path("runs", study).rglob("*")) if p.is_file()}


def _ckpts(study: str) -> dict[str, str]:
    return {k: v[0] for k, v in _state(study).items() if k.endswith(".pt")}


def _edit(path: str, old: str, new: str) -> None:
    text = Path(path).read_text()
    assert old in text, f"{old!r} not in {path}"
    Path(path).write_text(text.replace(old, new))


def _edit_calibration() -> None:
    cal = Path("runs/eqt_lm/calibration/bp.json")
    data = json.loads(cal.read_text())
    data["note"] = "edited by hand"
    cal.write_text(json.dumps(data))


def _jobs(log: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    block = log.split("Job stats:")[-1].split("total")[0] if "Job stats:" in log else ""
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_snakemake_reruns_exactly_what_changed(two_study_project) -> None:
    smk = [tool("snakemake"), "--cores", "2", "report"]
    _sh(*smk)
    assert (Path("reports/FINDINGS.md").is_file() and "profile: `tiny`"
            in Path("reports/FINDINGS.md").read_text())
    assert "Nothing to be done" in _sh(*smk)
    lm, lq = _ckpts("eqt_lm"), _state("rules_lq")

    _edit("models/nets/transformer.py", *LM_LINE)
    jobs = _jobs(_sh(*smk))
    assert jobs == {"calibrate": 1, "train": 2, "diagnose": 1, "report": 1}, jobs
    after = _ckpts("eqt_lm")
    assert all(after[k] != lm[k] for k in lm), "LM checkpoints must get new bytes"
    assert _state("rules_lq") == lq, "the other study's files must be untouched"

    _edit_calibration()
    jobs = _jobs(_sh(*smk))
    assert jobs == {"train": 2, "diagnose": 1, "report": 1}, jobs

    seg = {k: v for k, v in _ckpts("eqt_lm").items()}
    # the bp row sets its own steps (params.yaml's CPU row trains longer), so it is raised there
    jobs = _jobs(_sh(*smk, "--config",
                     "studies={eqt_lm: {rules: {bp: {kind: bp, train: {steps: 60}}}}}"))
    assert jobs == {"train": 1, "diagnose": 1, "report": 1}, jobs  # only the new segment
    assert all(_ckpts("eqt_lm")[k] == v for k, v in seg.items())
    assert _state("rules_lq") == lq


def test_dvc_reruns_exactly_what_changed_and_compares_experiments(two_study_project) -> None:
    dvc, git = tool("dvc"), ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _sh("git", "init", "-q")
    _sh(dvc, "init", "-q")
    _sh(dvc, "config", "core.analytics", "false")
    first = _sh(dvc, "repro")  # the tiny profile, named in params.yaml, runs under DVC
    assert "Running stage 'train_eqt_lm'" in first and Path("reports/FINDINGS.md").is_file()
    assert "Running stage" not in _sh(dvc, "repro")
    _sh("git", "add", "-A")
    _sh(*git, "commit", "-qm", "baseline")
    lm, lq = _ckpts("eqt_lm"), _state("rules_lq")

    _edit("models/nets/transformer.py", *LM_LINE)
    ran = set(re.findall(r"Running stage '([^']+)'", _sh(dvc, "repro")))
    assert ran == {"calibrate_eqt_lm", "train_eqt_lm", "diagnose_eqt_lm", "report"}, ran
    after = _ckpts("eqt_lm")
    assert all(after[k] != lm[k] for k in lm), "LM checkpoints must get new bytes"
    assert _state("rules_lq") == lq, "the other study's files must be untouched"

    lm = _ckpts("eqt_lm")
    _edit_calibration()
    ran = set(re.findall(r"Running stage '([^']+)'", _sh(dvc, "repro")))
    assert {"train_eqt_lm", "diagnose_eqt_lm", "report"} <= ran
    assert all(_ckpts("eqt_lm")[k] != lm[k] for k in lm), "an edited calibration retrains"

    lm = _ckpts("eqt_lm")
    tiny = Path("profiles/tiny.yaml")  # the profile sets steps (not decay_steps: a new segment)
    tiny.write_text(re.sub(r"(?<![\w])steps: 40", "steps: 60", tiny.read_text()))
    _sh(dvc, "repro")
    now = _ckpts("eqt_lm")
    assert len(now) == len(lm) + 1 and all(now[k] == v for k, v in lm.items())
    assert _state("rules_lq") == lq, "a study whose identity did not change is not retrained"

    _sh("git", "add", "-A")
    _sh(*git, "commit", "-qm", "edits")
    _sh(dvc, "exp", "run", "-S", "studies.eqt_lm.rules.bp.train.lr=0.002")
    shown = json.loads(_sh(dvc, "exp", "show", "--json", stdout_only=True))
    values = dict(_best_val_losses(shown))
    assert len(values) >= 2 and all(isinstance(v, float) for v in values.values()), values
    assert len(set(values.values())) >= 2, f"baseline and experiment must differ: {values}"


def _best_val_losses(shown: list[dict]) -> list[tuple[str, float]]:
    """(name, eqt_lm/bp best_val_loss) of the baseline and each experiment in `exp show --json`."""
    out = []
    for rev in shown:
        entries = [rev] + [e for exp in (rev.get("experiments") or []) for e in exp.get("revs", [])]
        for entry in entries:
            if entry.get("rev") == "workspace":
                continue
            data = (entry.get("data") or {}).get("metrics", {}).get("reports/metrics.json", {})
            value = data.get("data", {}).get("eqt_lm", {}).get("bp", {}).get("best_val_loss")
            out.append((entry.get("name") or entry.get("rev"), value))
    return out
