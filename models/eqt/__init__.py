"""Equilibrium transformer (the ``thick`` block run to a fixed point) and the EP family of rules.

Method text: METHODS.md §2 and log 003 (``assets/ept_method_intro.tex``). Layout: ``block`` (the
force F), ``relax`` (free phase), ``bptt`` / ``implicit`` / ``ep`` (gradient rules), ``stabilisers``
(jacreg, controller, resreg, validity gate), ``diagnostics``, ``calibration``, ``model`` (the LM
and the ``gradients`` dispatcher the pipeline calls).
"""
