"""One DAG definition: dvc.yaml is generated from models/dag.py, the Snakefile runs the same
commands with the same code and data inputs and outputs, and the code graph has no cycle."""

from __future__ import annotations

import os
import re
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from models.config.params import read_yaml
from models.dag import render_dvc_yaml
from models.identity import closure, coarsen, find_cycle, import_graph, stage_code
from tests.conftest import ROOT, tool


def test_committed_dvc_yaml_is_generated_from_the_dag() -> None:
    text = render_dvc_yaml(read_yaml(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == text, (
        "dvc.yaml is stale: run `python -m stages.dag` and commit it")


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def _is_code(dep: str) -> bool:
    return dep.split("/")[0] in ("models", "stages")


def _code_files(dep: str) -> set[str]:
    """A DVC code dep as files: a directory stands for every file under it."""
    path = ROOT / dep
    if path.is_file():
        return {dep}
    return {str(p.relative_to(ROOT)) for p in path.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def _snakemake_jobs() -> list[dict[str, object]]:
    """Every job of the default DAG: rule, inputs, outputs, shell command, from Snakemake's own
    dry run (so this reads the Snakefile as Snakemake does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BPFREE_PROFILE", "BPFREE_OVERRIDES")}
    out = subprocess.run([tool("snakemake"), "-n", "-p", "--forceall", "--cores", "1", "report",
                          "--directory", str(ROOT)], capture_output=True, text=True, env=env,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    jobs = []
    for block in re.split(r"\n(?=rule \w+:)", out.stdout + out.stderr)[1:]:
        fields = dict(re.findall(r"^\s+(input|output): (.*)$", block, re.M))
        jobs.append({"rule": re.match(r"rule (\w+):", block)[1],  # type: ignore[index]
                     "cmd": re.search(r"^Shell command: (.*)$", block, re.M)[1].strip(),  # type: ignore[index]
                     "inputs": set(fields.get("input", "").split(", ")) - {""},
                     "outputs": set(fields.get("output", "").split(", ")) - {""}})
    assert len(jobs) > 100, "expected the default DAG's jobs"
    return jobs


def _dvc_stage_of(job: dict[str, object]) -> str:
    rule = str(job["rule"])
    if rule in ("calibrate", "train", "diagnose"):
        return f"{rule}_{next(iter(job['outputs'])).split('/')[1]}"  # type: ignore[call-overload]
    return rule


@pytest.mark.slow
def test_snakefile_and_dvc_yaml_describe_the_same_dag() -> None:
    """Per stage: the same command (Snakemake's adds --row/--seed/--segment), the same code
    files, every data/artifact input inside a DVC dep, every output inside a DVC out."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    by_stage: dict[str, list[dict[str, object]]] = defaultdict(list)
    for job in _snakemake_jobs():
        by_stage[_dvc_stage_of(job)].append(job)
    assert set(by_stage) == set(dvc), (f"only snakemake: {set(by_stage) - set(dvc)}; "
                                       f"only dvc: {set(dvc) - set(by_stage)}")
    for name, jobs in by_stage.items():
        stage = dvc[name]
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage["outs"]]
        outs += [next(iter(m)) for m in stage.get("metrics", [])]
        deps = [d for d in stage["deps"] if not d.startswith("profiles/")]
        dvc_code = {f for d in deps if _is_code(d) for f in _code_files(d)}
        dvc_data = [d for d in deps if not _is_code(d)]
        covered: set[str] = set()
        for job in jobs:
            cmd = re.sub(r" --(row|seed|segment) \S+", "", str(job["cmd"]))
            assert cmd == stage["cmd"], f"{name}: snakemake `{job['cmd']}` vs dvc `{stage['cmd']}`"
            inputs: set[str] = job["inputs"]  # type: ignore[assignment]
            code = {i for i in inputs if i.endswith(".py")}
            assert code == dvc_code, (f"{name}: code only in snakemake {sorted(code - dvc_code)}, "
                                      f"only in dvc {sorted(dvc_code - code)}")
            for path in inputs - code:
                if _under(path, outs):
                    continue  # the previous segment of the same run
                assert _under(path, dvc_data), f"{name}: snakemake input {path} not a DVC dep"
                covered.update(d for d in dvc_data if _under(path, [d]))
            for path in job["outputs"]:  # type: ignore[attr-defined]
                assert _under(path, outs), f"{name}: snakemake output {path} outside DVC outs"
        assert covered == set(dvc_data), f"{name}: DVC deps no job reads: {set(dvc_data) - covered}"


def test_code_deps_follow_imports_per_study() -> None:
    lm, lq = set(stage_code("train", "eqt_lm")), set(stage_code("train", "rules_lq"))
    assert "models/nets/transformer.py" in lm and "models/eqt/ep.py" in lm
    assert "models/nets/transformer.py" not in lq and "models/ff/rules/dfa.py" in lq
    assert {"models/data/tokens.py", "models/health/__init__.py",
            "models/training/segments.py"} <= lm  # what train imports, found without a list
    assert "models/studies/rules_lq.py" not in lm  # studies load lazily: no cross-study deps


def test_coarse_code_deps_name_the_same_files(tmp_path: Path) -> None:
    """A directory replaces its files only when every file under it is a dep (bytecode aside)."""
    for rel in ("m/__init__.py", "m/a.py", "m/sub/__init__.py", "m/sub/b.py", "m/c/x.py",
                "m/c/y.py", "m/sub/__pycache__/b.cpython-311.pyc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    deps = ["m/__init__.py", "m/a.py", "m/sub/__init__.py", "m/sub/b.py", "m/c/x.py"]
    assert coarsen(deps, tmp_path) == ["m/sub", "m/__init__.py", "m/a.py", "m/c/x.py"]
    assert coarsen([*deps, "m/c/y.py"], tmp_path) == ["m"]


def test_import_graph_sees_relative_function_and_type_only_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "models"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from models.b import g\n    return g\n")
    (pkg / "b.py").write_text("import math\n")
    assert closure(("models.sub.a",), tmp_path) == (
        "models/__init__.py", "models/b.py", "models/sub/__init__.py", "models/sub/a.py")
    graph = import_graph(tmp_path)
    assert graph["models.sub.a"] == {"models.b"} and find_cycle(graph) is None
    # a type-only import back is a cycle too (the no-cycle rule counts TYPE_CHECKING imports)
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                              "    from models.sub.a import f\n")
    assert find_cycle(import_graph(tmp_path)) == ["models.b", "models.sub.a", "models.b"]


def test_no_import_cycle_inside_models() -> None:
    graph = import_graph()
    assert len(graph) > 40
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"
