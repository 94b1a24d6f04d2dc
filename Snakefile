# bpfree's Snakemake front-end. The same stages as dvc.yaml (tests/test_dag_consistency.py checks
# it): prepare -> bpe -> calibrate -> train segments -> diagnose -> report.
# Parameters come from params.yaml (plus profiles/$BPFREE_PROFILE.yaml), validated by models.config.
# Training segments are separate jobs chained checkpoint to checkpoint: raising `steps` re-uses
# the finished segments; changing anything else that affects training re-runs them (params trigger).
import os
import sys

from models.config import load_params
from models.pipeline import (code_files, mnist1d_file, runs, text_dir, tokens_dir,
                             training_fingerprint, RunSpec)
from models.studies import get_study

# Jobs run `python -m stages.*`: make that the interpreter running Snakemake (e.g. .venv's),
# also when snakemake is called by path without activating the environment.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

configfile: "params.yaml"
if config.get("profile"):
    os.environ["BPFREE_PROFILE"] = str(config["profile"])
P = load_params("params.yaml")
RUNS = runs(P)

wildcard_constraints:
    study="[a-z0-9_]+",
    row="[A-Za-z0-9_-]+",
    seed="[0-9]+",
    k="[0-9]{4}",


def spec(w):
    return RunSpec(w.study, w.row, int(w.seed))


def train_cfg(w):
    return P.study(w.study).row_train(w.row)


def last_ckpt(w):
    s = spec(w)
    return str(s.ckpt(train_cfg(w).n_segments - 1))


rule report:
    input:
        diagnostics=[str(s.diagnostics) for s in RUNS],
        code=code_files("report"),
    output:
        "reports/FINDINGS.md",
        "reports/metrics.json",
    shell:
        "python -m stages.report"


rule prepare:
    input:
        code_files("prepare"),
    output:
        f"{text_dir()}/train.txt",
        f"{text_dir()}/val.txt",
        f"{text_dir()}/meta.json",
    params:
        cfg=P.data.text.model_dump_json(),
    shell:
        "python -m stages.prepare"


rule bpe:
    input:
        f"{text_dir()}/train.txt",
        f"{text_dir()}/val.txt",
        code_files("bpe"),
    output:
        f"{tokens_dir()}/tokenizer.json",
        f"{tokens_dir()}/train.bin",
        f"{tokens_dir()}/val.bin",
        f"{tokens_dir()}/meta.json",
    params:
        cfg=P.data.tokenizer.model_dump_json(),
    shell:
        "python -m stages.bpe"


DATASET_FILES = {
    "tokens": [f"{tokens_dir()}/meta.json", f"{tokens_dir()}/train.bin", f"{tokens_dir()}/val.bin"],
    "mnist1d": [str(mnist1d_file())],
}


def study_data(w):
    """The prepared data a study reads (tokens, mnist1d, or none: ladder/LQ generate theirs)."""
    return [f for d in get_study(w.study).datasets for f in DATASET_FILES[d]]


rule prepare_mnist1d:
    input:
        code_files("prepare_mnist1d"),
    output:
        str(mnist1d_file()),
    params:
        cfg=P.data.mnist1d.model_dump_json(),
    shell:
        "python -m stages.prepare --dataset mnist1d"


rule calibrate:
    input:
        study_data,
        code_files("calibrate"),
    output:
        "runs/{study}/{row}/calibration.json",
    params:
        cfg=lambda w: training_fingerprint(P, RunSpec(w.study, w.row, P.seeds[0])),
    shell:
        "python -m stages.calibrate --study {wildcards.study} --row {wildcards.row}"


def segment_inputs(w):
    s = spec(w)
    k = int(w.k)
    deps = [str(s.calibration), *study_data(w), *code_files("train")]
    return deps + ([str(s.ckpt(k - 1))] if k > 0 else [])


rule train:
    input:
        segment_inputs,
    output:
        ckpt="runs/{study}/{row}/seed{seed}/ckpt/seg{k}.pt",
        log="runs/{study}/{row}/seed{seed}/log/seg{k}.jsonl",
    params:
        fingerprint=lambda w: training_fingerprint(P, spec(w)),
        end=lambda w: train_cfg(w).segment_end(int(w.k)),
    threads: P.threads
    shell:
        "python -m stages.train --study {wildcards.study} --row {wildcards.row} "
        "--seed {wildcards.seed} --segment {wildcards.k}"


rule diagnose:
    input:
        last_ckpt,
        code_files("diagnose"),
    output:
        "runs/{study}/{row}/seed{seed}/diagnostics.json",
    threads: P.threads
    shell:
        "python -m stages.diagnose --study {wildcards.study} --row {wildcards.row} "
        "--seed {wildcards.seed}"
