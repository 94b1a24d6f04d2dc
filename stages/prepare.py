"""Stage 1: build the train/val text splits (offline generated corpus by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from models import io
from models.config import Mnist1DDataConfig
from models.data.sources import load_text, split_text
from models.pipeline import mnist1d_file, text_dir
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(params: Path = PARAMS_OPTION,
         dataset: str = typer.Option("text", help="text (the LM corpus) or mnist1d (the "
                                     "rules-vision default, generated offline).")) -> None:
    """Write data/text/{train,val}.txt and meta.json from params `data.text`, or with
    `--dataset mnist1d` data/mnist1d/data.npz from params `data.mnist1d`.

    source=generated makes a deterministic story corpus from (stories, seed); source=file reads
    `path`, source=url downloads `url` (only then) — both verified against `sha256`.
    """
    if dataset not in ("text", "mnist1d"):
        raise ValueError(f"--dataset must be text or mnist1d (got {dataset!r})")
    if dataset == "mnist1d":
        _mnist1d(load(params).data.mnist1d)
        return
    cfg = load(params).data.text
    out = text_dir()
    text, provenance = load_text(cfg, cache_dir=Path("data/cache"))
    train, val = split_text(text, cfg.val_fraction)
    io.write_text(out / "train.txt", train)
    io.write_text(out / "val.txt", val)
    io.write_json(out / "meta.json", {**provenance, "train_chars": len(train),
                                      "val_chars": len(val)})
    print(f"prepare: {len(train):,} train / {len(val):,} val characters -> {out}")



def _mnist1d(cfg: Mnist1DDataConfig) -> None:
    """Generate MNIST-1D (no download) and write it as one npz, atomically."""
    from models.ff.tasks.mnist1d import load_mnist1d

    split = load_mnist1d(cfg.num_samples, cfg.seed)
    out = mnist1d_file()
    with io.atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, x=split.x_train.numpy(), y=split.y_train.numpy(),
                 x_test=split.x_test.numpy(), y_test=split.y_test.numpy())
    print(f"prepare: MNIST-1D {len(split.x_train)} train / {len(split.x_test)} test -> {out}")


if __name__ == "__main__":
    cli()
