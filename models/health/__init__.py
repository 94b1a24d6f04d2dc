"""Health checks: detectors for the failure modes of METHODS §5, run on what training records.

``run_all(trace, extras)`` runs every detector whose inputs are present. ``trace`` is the scalar
log (one row per logged step, CONVENTIONS prefixes); ``extras`` holds diagnostics outputs:

- ``coverage_slots``: {name: per-slot mask} -> low_coverage names the dark slots
- ``residual_curve``: residual per relaxation step of one free phase -> limit_cycle
- ``self_coherence`` (+ ``self_coherence_reference``): EP batch self-cosines -> ep_self_coherence
  (else a ``self_coherence`` trace column)
- ``vocab_size`` or ``loss_limit``: the loss bound for frozen_explosion (1.5 ln V)
- ``no_grad_path``: term names flagged by recorders.term_grad_norm -> no_gradient_path
- ``outputs`` (strings or array) and ``soft_tokens`` (array [N, ...]) -> output_collapse
- ``rms``: {connection: (rms_fed, rms_expected)} -> magnitude_mismatch
- ``posterior``: {lm_matched, lm_shuffled} (the consumer's loss with its own vs shuffled
  conditioning) -> posterior_collapse; ``pre_tanh``: a tanh's inputs -> tanh_saturation;
  ``codes``: {codes, codebook_size} -> codebook_collapse; ``generations`` -> empty_generations
- ``config_train`` / ``config_eval``: resolved config dicts incl. prompts -> config_drift
- ``chance`` (+ ``chance_what``, ``untrained_loss``): the uninformed loss -> worse_than_chance;
  it also sets the frozen_explosion loss bound (1.5 chance) when ``loss_limit`` is not given
- ``baselines`` (``progress.Baseline`` dicts) and ``metrics`` (held-out) -> learns_nothing
- ``metrics`` cosines (``cos/*``, ``gamma/*``) and ``warmup_steps`` -> estimator_sign;
  ``self_coherence_groups`` (+ ``_ref``) -> estimator_sign per group

``calibration_extras`` turns what calibration recorded (``calibration.json["health"]``) into
these keys. Detectors on the trace alone: runaway_norms, norm_excursions, divergence,
settling_at_cap, gated_steps (steps a validity gate left without a task gradient),
estimator_accuracy (training cosines below the GPU-scale issue's bar),
unstable_equilibrium (cosine checkpoints at which z* was not a stable fixed point);
worse_than_chance and estimator_sign also flag mid-run episodes (a run that
went worse than chance or pointed uphill for a while and came back).

Severities: fatal = the run's numbers are meaningless (NaN, a frozen or far-above-chance
explosion, norms up 1000x; the live guard stops on these); error = the row's result is suspect
(it learned nothing, diverged, an estimator points uphill, a loop never settles); warning = look
at it; info = context.
"""

from __future__ import annotations

from models.health.finding import Finding, Severity
from models.health.guard import fatal_findings, live_guard
from models.health.run import calibration_extras, run_all

__all__ = ["Finding", "Severity", "calibration_extras", "fatal_findings", "live_guard",
           "run_all"]
