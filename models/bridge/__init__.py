"""The latent bridge (METHODS §4, log 004): the generated word-problem corpus and the study's
metrics. The source/target LMs, the bridge rules and the study module build on these."""
