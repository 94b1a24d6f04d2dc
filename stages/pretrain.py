"""Stage: pretrain the bridge study's two frozen language models (METHODS §4, log 004).

The source (characters) and the target (words) are trained by plain backprop on the generated
word problems of `studies.bridge.task`, then frozen; the bridge rows only ever train the bridge
between them. Writes data/bridge/lms.pt and meta.json (the text baseline on the validation
split), or stops with an error when the target cannot answer from text.
"""

from __future__ import annotations

from pathlib import Path

from models.config.bridge import BridgeStudyConfig
from models.pipeline import bridge_dir
from models.training.device import resolve_device
from stages._cli import PARAMS_OPTION, app, clear_errors, load, study_enabled

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(params: Path = PARAMS_OPTION) -> None:
    """Pretrain both LMs of `studies.bridge.task` and check that the target answers from text
    (`task.min_text_accuracy` of the validation problems)."""
    from models.bridge.data import prepare  # torch and the bridge code: only when it runs

    cfg = load(params)
    if not study_enabled(cfg, "bridge"):
        return
    task = cfg.study_as("bridge", BridgeStudyConfig).task
    meta = prepare(task, bridge_dir(), resolve_device(cfg.device))
    print(f"pretrain: source {meta['source_vocab']} chars, target {meta['target_vocab']} words; "
          f"text baseline answers {meta['text_val_accuracy']:.1%} of {meta['n_val']} validation "
          f"problems -> {bridge_dir()}")


if __name__ == "__main__":
    cli()
