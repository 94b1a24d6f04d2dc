"""The health detectors on real GPU runs of the pipeline (tests/data/gpu_short_9ef6e87): the
2k-step protocol's EP without AEP went through a broken phase and came back, which the late-level
detectors alone missed ("no findings" in that report); EP with AEP, BPTT and BP are healthy."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from models.health import Severity, calibration_extras, run_all
from models.training.segments import read_logs

RUNS = Path(__file__).parent / "data" / "gpu_short_9ef6e87"


def findings(row: str, runs: Path = RUNS) -> list:
    d = runs / row
    extras = calibration_extras(json.loads((d / "calibration.json").read_text()))
    extras["metrics"] = json.loads((d / "diagnostics.json").read_text())["metrics"]
    extras["warmup_steps"] = 200  # the profile's warm-up
    return run_all(pd.DataFrame.from_records(read_logs(d)), extras, run=f"eqt_lm/{row}/seed0")


def test_ep_without_aep_broken_phase_is_flagged() -> None:
    found = findings("ep_noaep")
    errors = {f.detector: f for f in found if f.severity == Severity.ERROR}
    # val CE 12.5 at step 1000 after 3.32 at step 750: worse than chance mid-run
    assert errors["worse_than_chance"].evidence["peak_step"] == 1000
    assert errors["worse_than_chance"].evidence["ratio"] > 2.5
    # |z*| 1.3 -> 158 and still ~24 late: an excursion that stayed
    assert "act/z_star" in errors["norm_excursion"].message
    warned = [f for f in found if f.severity == Severity.WARNING]
    assert any(f.detector == "norm_excursion" and "grad" in f.message for f in warned)
    signs = [f.message for f in warned if f.detector == "estimator_sign"]
    assert any("attn.q" in m for m in signs) and any("attn.k" in m for m in signs)
    assert all(f.run == "eqt_lm/ep_noaep/seed0" for f in found)


@pytest.mark.parametrize("row", ["ep", "bptt", "bp"])
def test_healthy_gpu_rows_are_silent(row: str) -> None:
    assert findings(row) == []


def test_ep_checkpoints_below_the_bar_are_a_warning() -> None:
    """e0f532b's EP trained well (val 2.483 vs BPTT 2.503) with four checkpoints below the
    GPU-scale issue's bar: one warning that names them, nothing worse."""
    found = findings("ep", RUNS.parent / "gpu_short_e0f532b")
    assert all(f.severity == Severity.WARNING for f in found), [f.message for f in found]
    (acc,) = [f for f in found if f.detector == "estimator_accuracy"]
    assert acc.evidence["checkpoints_below"] == 4 and acc.evidence["checkpoints"] == 8
    assert "step 750: attn.k +0.10" in acc.message and "step 1500" in acc.message
    assert acc.evidence["min_cos"] < 0.1


@pytest.mark.parametrize("row", ["ep", "bptt"])
def test_an_unstable_held_out_batch_is_a_warning(row: str) -> None:
    """ff7c04e: every training checkpoint stable and EP at cos >= 0.999, but z* unstable on one
    held-out batch at the final weights (diagnose; EP's 4-batch mean cos to BPTT 0.997, to the
    implicit gradient 0.842 with that batch averaged in): one warning that says so, nothing
    else. These diagnostics predate held_out_cosines, and the message says their mean includes
    the unstable batch."""
    (found,) = findings(row, RUNS.parent / "gpu_short_ff7c04e")
    assert found.detector == "unstable_equilibrium" and found.severity == Severity.WARNING
    assert found.evidence == {"batches_unstable": 1.0}
    assert "on 1 held-out batch at the final weights" in found.message
    assert "averages them in" in found.message and "stable held-out" not in found.message
    assert "cosine checkpoints" not in found.message


FF7C04E = Path(__file__).parents[1] / "reports" / "gpu-short" / "ff7c04e" / "runs"


def with_ngram_baselines(row: str) -> list:
    """ff7c04e's findings for ``row`` (all four rows, reports/gpu-short/ff7c04e) judged against
    the n-gram baselines of ``baselines.language_model`` recomputed on the same corpus split
    (tests/data/gpu_short_ff7c04e/ngram_baselines.json); the row's own untrained-net baseline
    stays as its calibration measured it."""
    d = FF7C04E / f"eqt_lm_{row}_seed0"
    extras = calibration_extras(json.loads((d / "calibration.json").read_text()))
    ngrams = json.loads((RUNS.parent / "gpu_short_ff7c04e" / "ngram_baselines.json").read_text())
    assert ngrams["chance"] == pytest.approx(extras["chance"])  # the same vocabulary (ln 85)
    extras["baselines"] = [*ngrams["baselines"],
                           *(b for b in extras["baselines"] if b["name"] == "untrained")]
    extras["metrics"] = json.loads((d / "diagnostics.json").read_text())["metrics"]
    extras["warmup_steps"] = 200
    return run_all(pd.DataFrame.from_records(read_logs(d)), extras, run=f"eqt_lm/{row}/seed0")


@pytest.mark.parametrize(("row", "val"), [("bptt", 2.5025), ("ep", 2.5080), ("ep_noaep", 2.5693)])
def test_equilibrium_rows_at_ff7c04e_learn_no_context(row: str, val: float) -> None:
    """The 2k-step protocol's equilibrium rows ended 0.03-0.04 nats under a character bigram
    (2.541) and 0.48 above the trigram (2.028): an error that names the row and both numbers;
    EP without AEP was above the bigram itself."""
    found = [f for f in with_ngram_baselines(row) if f.detector == "learns_nothing"]
    assert len(found) == 1 and found[0].severity == Severity.ERROR
    f = found[0]
    assert f.run == f"eqt_lm/{row}/seed0"
    assert f.message.startswith(f"learns no context: held-out final_val_loss {val:.4g} against "
                                "the bigram's 2.541")
    assert f.evidence["context_baseline"] == pytest.approx(2.5415, abs=1e-4)
    assert f.evidence["value"] == pytest.approx(val, abs=1e-4)


def test_bp_row_at_ff7c04e_learns_context() -> None:
    """BP's transformer (1.676) is below every n-gram: learns_nothing is silent on it."""
    assert not [f for f in with_ngram_baselines("bp") if f.detector == "learns_nothing"]
