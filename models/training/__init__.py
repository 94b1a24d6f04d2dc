"""Segmented training: full-state checkpoints, RNG capture, LR schedule, the segment driver."""
