"""Sequence models trained without backprop: a predictive-coding hierarchy (``pc``) and a latent
world model trained by difference target propagation (``dtp``), with the learned precisions
(``precision``) and the working-memory meter (``memory``) they share."""
