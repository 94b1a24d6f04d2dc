"""Where each new detector's threshold sits, on the issue's own numbers (log 003's EP run at
the GPU recipe, the rules_lq credit bridge, rules_vision's PC) written as the trace rows the
trainers log, plus the report's row marks. The acceptance tests on real runs are in
test_health_{ep,ff}_runs.py."""

from __future__ import annotations

import pandas as pd

from models.health import Severity, calibration_extras, fatal_findings, run_all
from models.health.dynamics import frozen_explosion, settling_at_cap
from models.health.progress import Baseline, learns_nothing, worse_than_chance
from models.report.findings import MARK_LEGEND, row_marks, worst_first_dicts

LN_V = 4.357  # ln 78, the issue's char-level corpus

# The issue's EP run (H100, lr 1e-3): step, train loss, |z*|, gradient norm, residual.
EP_RUN = [(50, 4.1, 0.7, 0.4, 3e-8), (100, 3.6, 2.0, 1.0, 3e-8), (150, 3.3, 12, 6, 3e-8),
          (200, 3.19, 29, 15, 3e-8), (250, 4.5, 80, 200, 3e-8), (300, 7.0, 160, 800, 3e-8),
          (350, 9.32, 224, 1418, 3e-8), (400, 20.0, 230, 2000, 3e-8), (450, 30.0, 232, 2500, 3e-8),
          (500, 38.5, 234, 2862, 3e-8)]


def ep_trace() -> pd.DataFrame:
    return pd.DataFrame([{"step": s, "lr": 1e-3, "loss": loss, "act/z_star": z, "grad/global": g,
                          "residual": r} for s, loss, z, g, r in EP_RUN])


def test_issue_ep_run_is_fatal_with_nonzero_residual() -> None:
    found = run_all(ep_trace(), calibration_extras({"ln_vocab": LN_V}), run="eqt_lm/ep/seed0")
    detectors = {f.detector: f for f in found}
    assert detectors["frozen_explosion"].severity == Severity.FATAL  # res 3e-8, not 0
    assert "|z*| RMS 0.7" in detectors["frozen_explosion"].message
    assert detectors["worse_than_chance"].severity == Severity.FATAL
    assert detectors["divergence"].severity == Severity.ERROR
    assert "act/z_star" in detectors["divergence"].message
    assert detectors["runaway_norms"].evidence["ratio"] > 1000
    assert all(f.run == "eqt_lm/ep/seed0" for f in found)
    assert fatal_findings({"step": 500, "loss": 38.5, "residual": 3e-8}, vocab_size=78)


def test_frozen_explosion_needs_both_float_floor_and_a_bad_loss() -> None:
    ok = pd.DataFrame({"step": [1, 2], "loss": [1.6, 1.6], "residual": [3e-8, 3e-8]})
    converging = pd.DataFrame({"step": [1, 2], "loss": [30.0, 30.0], "residual": [1e-4, 1e-4]})
    assert frozen_explosion(ok, loss_limit=6.5) == []
    assert frozen_explosion(converging, loss_limit=6.5) == []


def test_worse_than_chance_error_then_fatal() -> None:
    trace = pd.DataFrame({"step": range(8), "loss": [4.4] * 4 + [4.7] * 4})
    (f,) = worse_than_chance(trace, LN_V, untrained=4.4)
    assert f.severity == Severity.ERROR
    trace["loss"] = [4.4] * 4 + [7.0] * 4
    (g,) = worse_than_chance(trace, LN_V, untrained=4.4)
    assert g.severity == Severity.FATAL
    trace["loss"] = [4.4] * 4 + [4.4] * 4  # within 5% of chance: learns_nothing's business
    assert worse_than_chance(trace, LN_V) == []


def test_learns_nothing_must_beat_and_floor() -> None:
    head = {"name": "head_only", "metric": "test_loss", "value": 0.041, "se": 0.002,
            "higher_is_better": False, "must_beat": False}
    # rules_lq credit bridge: test MSE 0.789 against a head alone at 0.041: error
    (f,) = learns_nothing({"test_loss": 0.789}, [head])
    assert f.severity == Severity.ERROR and "worse than" in f.message
    # DFA / state bridge at 0.041: the head alone is optimal on a linear task, not a floor
    assert learns_nothing({"test_loss": 0.0415}, [head]) == []
    acc = Baseline("head_only", "test_accuracy", 0.30, 0.014, True, must_beat=True)
    # rules_vision DFA 27.3% vs the head alone ~30%: no better -> error; BP 60% passes
    assert learns_nothing({"test_accuracy": 0.273}, [acc])[0].severity == Severity.ERROR
    assert learns_nothing({"test_accuracy": 0.60}, [acc]) == []


def test_learns_no_context_against_the_bigram_margin() -> None:
    """Shakespeare char-level n-grams (unigram 3.329, bigram 2.541, trigram 2.028; margin a
    quarter of the bigram-trigram gap, 0.128): a row 0.04 under the bigram learns no context
    though it is many SE better; one 0.2 under it passes; one above the unigram learns nothing
    at all (no "context" head); the trigram is never judged."""
    refs = [Baseline("constant", "final_val_loss", 3.329, 0.0016, False),
            Baseline("bigram", "final_val_loss", 2.541, 0.0018, False, context=True,
                     margin=0.128),
            Baseline("trigram", "final_val_loss", 2.028, 0.002, False, must_beat=False,
                     judged=False)]
    (f,) = learns_nothing({"final_val_loss": 2.503}, refs)
    assert f.severity == Severity.ERROR
    assert f.message.startswith("learns no context: held-out final_val_loss 2.503 against the "
                                "bigram's 2.541")
    assert "needed 0.128" in f.message and f.evidence["context_baseline"] == 2.541
    assert learns_nothing({"final_val_loss": 2.34}, refs) == []  # between bigram and trigram
    (g,) = learns_nothing({"final_val_loss": 3.4}, refs)
    assert g.message.startswith("held-out final_val_loss 3.4 is worse than the constant")
    assert "bigram" in g.message and "context_baseline" not in g.evidence
    assert learns_nothing({"final_val_loss": 2.2}, refs[2:]) == []


def test_settling_at_cap_warning_on_most_error_on_all() -> None:
    res = [0.02, 0.027, 0.025, 0.021]
    trace = pd.DataFrame({"step": range(4), "residual": res, "settle_iters": [66] * 4,
                          "settle/inference/tol": [3e-3] * 4, "settle/inference/cap": [66] * 4})
    (f,) = settling_at_cap(trace)
    assert f.severity == Severity.ERROR and "cap of 66" in f.message
    trace["residual"] = [0.02, 0.027, 1e-3, 0.021]
    assert settling_at_cap(trace)[0].severity == Severity.WARNING
    trace["residual"] = [0.02, 1e-3, 1e-3, 1e-3]
    assert settling_at_cap(trace) == []


def test_report_marks_worst_row_finding_with_a_legend() -> None:
    findings = [{"severity": "warning", "run": "s/a/seed0"}, {"severity": "error", "run": "s/b/seed1"},
                {"severity": "fatal", "run": "s/b/seed0"}, {"severity": "error", "run": "s/c/seed0"}]
    assert row_marks(findings) == {"b": " ✖", "c": " ⚠"}
    assert [f["severity"] for f in worst_first_dicts(findings)] == ["fatal", "error", "error",
                                                                    "warning"]
    assert "✖" in MARK_LEGEND and "⚠" in MARK_LEGEND


def test_group_self_coherence_needs_a_coherent_reference() -> None:
    from models.health.estimators import group_self_coherence

    # log 003's plateau: EP -0.27 while BPTT +0.96, EP not tracking BPTT on that group
    (f,) = group_self_coherence({"attn.q": -0.27}, {"attn.q": 0.96}, {"cos/attn.q": 0.2})
    assert f.severity == Severity.ERROR and "attn.q" in f.message
    # BPTT itself incoherent on the group: batch noise near an optimum, not the estimator
    assert group_self_coherence({"attn.q": -0.05}, {"attn.q": 0.08}) == []
    # tracks BPTT per batch (cos 0.83): a few noisy batch pairs, look at it
    (g,) = group_self_coherence({"attn.o": -0.12}, {"attn.o": 0.46}, {"cos/attn.o": 0.83})
    assert g.severity == Severity.WARNING


def test_report_health_summary_lists_rows_worst_first() -> None:
    from models.report.findings import health_summary

    findings = [{"severity": "error", "run": "s/b/seed0", "detector": "learns_nothing"},
                {"severity": "fatal", "run": "s/a/seed1", "detector": "worse_than_chance"},
                {"severity": "error", "run": "s/a/seed0", "detector": "divergence"},
                {"severity": "warning", "run": "s/c/seed0", "detector": "limit_cycle"}]
    lines = [line for line in health_summary(findings) if line.startswith("- ")]
    assert lines == ["- **fatal** ✖ `s/a`: worse_than_chance, divergence",
                     "- **error** ⚠ `s/b`: learns_nothing"]
    assert "no run" in health_summary(findings[3:])[0]


def test_chance_excursion_needs_two_training_rows_or_one_validation_row() -> None:
    losses = [4.3, 3.5, 3.0, 2.8, 5.0, 2.7, 2.6, 2.6]  # one batch above ln V: noise
    trace = pd.DataFrame({"step": range(10, 90, 10), "loss": losses})
    assert worse_than_chance(trace, LN_V) == []
    trace.loc[5, "loss"] = 4.9  # two consecutive rows: a phase
    (found,) = worse_than_chance(trace, LN_V)
    assert found.severity == Severity.WARNING and found.evidence["rows_over"] == 2
    val = pd.DataFrame({"step": range(10, 90, 10), "val_loss": [4.3, 3.5, 3.0, 2.8, 9.0, 2.7,
                                                                 2.6, 2.6]})
    (found,) = worse_than_chance(val, LN_V)  # a held-out average counts alone; 2x chance: error
    assert found.severity == Severity.ERROR and found.evidence["peak_step"] == 50


def test_norm_excursion_reads_states_and_global_norms_only() -> None:
    from models.health.norms import norm_excursions

    steps = range(50, 550, 50)
    z = [1.0, 1.1, 1.2, 5, 40, 150, 60, 3, 1.5, 1.3]  # ran away, came back
    key_grad = [0.005, 0.005, 0.01, 0.1, 0.6, 0.3, 0.1, 0.1, 0.09, 0.09]  # from near zero
    trace = pd.DataFrame({"step": steps, "act/z_star": z, "grad/block.attn.k.weight": key_grad})
    (found,) = norm_excursions(trace)
    assert found.severity == Severity.WARNING and "act/z_star" in found.message
    trace["act/z_star"] = [1.0, 1.1, 1.2, 5, 40, 150, 60, 30, 25, 24]  # and stayed
    assert norm_excursions(trace)[0].severity == Severity.ERROR
