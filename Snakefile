# bpfree's Snakemake front-end over the one DAG definition (models/dag.py), which also generates
# dvc.yaml: prepare -> bpe -> calibrate -> train segments -> diagnose -> report.
# Params: params.yaml, then the profile it names (`--config profile=tiny` or $BPFREE_PROFILE),
# then any other `--config key=value` (nested values in YAML flow style, e.g.
# --config 'studies={eqt_lm: {train: {lr: 0.002}}}'), merged and validated as one document (an
# unknown key is an error); the stage jobs see the same overrides through $BPFREE_OVERRIDES.
# Reruns: a job re-runs when its params (the run's training-config fingerprint), code (the
# import graph of its stage and study), calibration or data change; raising `steps` only adds
# segments. Training segments are separate jobs chained checkpoint to checkpoint.
import json
import os
import sys
from pathlib import Path

from models.config.params import changed_keys, load_params, read_yaml
from models.dag import dataset_inputs
from models.identity import stage_code
from models.pipeline import (RunSpec, calibration_fingerprint, mnist1d_file,
                             report_code, runs, text_dir, tokens_dir, training_fingerprint)

# Jobs run `python -m stages.*`: make that the interpreter running Snakemake (e.g. .venv's),
# also when snakemake is called by path without activating the environment.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

configfile: "params.yaml"
_raw = read_yaml(Path("params.yaml"))
_overrides = changed_keys(dict(config), _raw)
os.environ["BPFREE_OVERRIDES"] = json.dumps(_overrides)
P = load_params("params.yaml", overrides=_overrides)
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
    return str(spec(w).ckpt(train_cfg(w).n_segments - 1))


rule report:
    input:
        diagnostics=[str(s.diagnostics) for s in RUNS],
        logs=[str(s.log(i)) for s in RUNS
              for i in range(P.study(s.study).row_train(s.row).n_segments)],  # the curves
        code=report_code(),
    output:
        "reports/FINDINGS.md",
        "reports/metrics.json",
        directory("reports/figures"),
        directory("reports/curves"),
    params:
        profile=P.profile,
    shell:
        "python -m stages.report"


rule prepare:
    input:
        stage_code("prepare"),
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
        stage_code("bpe"),
    output:
        f"{tokens_dir()}/meta.json",
        f"{tokens_dir()}/tokenizer.json",
        f"{tokens_dir()}/train.bin",
        f"{tokens_dir()}/val.bin",
    params:
        cfg=P.data.tokenizer.model_dump_json(),
    shell:
        "python -m stages.bpe"


rule prepare_mnist1d:
    input:
        stage_code("prepare"),
    output:
        str(mnist1d_file()),
    params:
        cfg=P.data.mnist1d.model_dump_json(),
    shell:
        "python -m stages.prepare --dataset mnist1d"


rule pretrain_bridge:
    input:
        stage_code("pretrain"),
    output:
        "data/bridge/lms.pt",
        "data/bridge/meta.json",
    params:
        cfg=P.studies.bridge.task.model_dump_json() if P.studies.bridge else "",
        device=P.device,
    shell:
        "python -m stages.pretrain"


rule calibrate:
    input:
        lambda w: dataset_inputs(w.study),
        lambda w: stage_code("calibrate", w.study),
    output:
        "runs/{study}/calibration/{row}.json",
    params:
        cfg=lambda w: calibration_fingerprint(P, w.study, w.row),
    shell:
        "python -m stages.calibrate --study {wildcards.study} --row {wildcards.row}"


def segment_inputs(w):
    s, k = spec(w), int(w.k)
    deps = [str(s.calibration), *dataset_inputs(w.study), *stage_code("train", w.study)]
    return deps + ([str(s.ckpt(k - 1))] if k > 0 else [])


rule train:
    input:
        segment_inputs,
    output:
        ckpt="runs/{study}/train/{row}/seed{seed}/ckpt/seg{k}.pt",
        log="runs/{study}/train/{row}/seed{seed}/log/seg{k}.jsonl",
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
        lambda w: str(spec(w).calibration),
        lambda w: dataset_inputs(w.study),
        lambda w: stage_code("diagnose", w.study),
    output:
        "runs/{study}/diagnostics/{row}/seed{seed}.json",
    params:
        health=P.health.model_dump_json(),
        eval=lambda w: P.study(w.study).row_train(w.row).model_dump_json(),
    threads: P.threads
    shell:
        "python -m stages.diagnose --study {wildcards.study} --row {wildcards.row} "
        "--seed {wildcards.seed}"
