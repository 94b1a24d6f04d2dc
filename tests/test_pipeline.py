"""End to end on the tiny profile: Snakemake and DVC build the report, re-run only what changed,
and describe the same DAG."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT, tiny_params, tool

pytestmark = pytest.mark.slow


def _sh(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _set_params(project, extra: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(extra)))


def _jobs(log: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table as {rule: count}."""
    block = log.split("Job stats:")[-1].split("total")[0] if "Job stats:" in log else ""
    return {m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_snakemake_builds_then_noop_then_extends(project) -> None:
    smk = tool("snakemake")
    _sh(smk, "--cores", "2", "report")
    findings = (project / "reports" / "FINDINGS.md").read_text()
    assert "| bp |" in findings and "### Health" in findings
    assert (project / "reports" / "metrics.json").is_file()
    assert "Nothing to be done" in _sh(smk, "--cores", "2", "report")
    seg0 = (project / "runs/eqt_lm/bp/seed0/ckpt/seg0000.pt").stat().st_mtime_ns
    _set_params(project, {"studies": {"eqt_lm": {"train": {"steps": 60}}}})
    jobs = _jobs(_sh(smk, "--cores", "2", "report"))
    assert jobs.get("train") == 1, jobs  # only the new segment trains
    assert "prepare" not in jobs and "bpe" not in jobs
    assert (project / "runs/eqt_lm/bp/seed0/ckpt/seg0000.pt").stat().st_mtime_ns == seg0


def test_dvc_repro_noop_and_param_edit(project) -> None:
    _sh("git", "init", "-q")
    _sh("git", "add", "-A")
    _sh("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    dvc = tool("dvc")
    _sh(dvc, "init", "-q")
    _sh(dvc, "config", "core.analytics", "false")
    first = _sh(dvc, "repro")
    assert "Running stage 'prepare'" in first and (project / "reports/FINDINGS.md").is_file()
    second = _sh(dvc, "repro")
    assert "Running stage" not in second
    _set_params(project, {"studies": {"eqt_lm": {"train": {"lr": 0.002}}}})
    third = _sh(dvc, "repro")
    ran = set(re.findall(r"Running stage '([^'@]+)", third))
    assert {"train_eqt_lm", "diagnose_eqt_lm", "report"} <= ran
    assert not ran & {"prepare", "bpe"}


def _snakemake_commands() -> set[str]:
    out = _sh(tool("snakemake"), "-n", "-p", "--forceall", "--cores", "1", "report",
              "--directory", str(ROOT))
    prefix = "Shell command: "
    cmds = {line[len(prefix):].strip() for line in out.splitlines() if line.startswith(prefix)}
    return {re.sub(r" --segment \d+", "", c) for c in cmds}


def _dvc_commands() -> set[str]:
    out = _sh(tool("dvc"), "repro", "--dry", "--force")
    return {line.strip()[2:] for line in out.splitlines() if line.strip().startswith("> python")}


def test_snakefile_and_dvc_yaml_describe_the_same_dag(monkeypatch) -> None:
    """Same commands (a segment job is the DVC train command plus `--segment i`), same stages."""
    monkeypatch.chdir(ROOT)
    smk, dvc = _snakemake_commands(), _dvc_commands()
    assert smk == dvc, f"only snakemake: {smk - dvc}; only dvc: {dvc - smk}"
    rules = {c.split()[2].split(".")[1] for c in smk}
    assert rules == {"prepare", "bpe", "calibrate", "train", "diagnose", "report"}
