"""Stage 1: build the train/val text splits (offline generated corpus by default)."""

from __future__ import annotations

from pathlib import Path

from models import io
from models.data.sources import load_text, split_text
from models.pipeline import text_dir
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(params: Path = PARAMS_OPTION) -> None:
    """Write data/text/{train,val}.txt and meta.json from params `data.text`.

    source=generated makes a deterministic story corpus from (stories, seed); source=file reads
    `path`, source=url downloads `url` (only then) — both verified against `sha256`.
    """
    cfg = load(params).data.text
    out = text_dir()
    text, provenance = load_text(cfg, cache_dir=Path("data/cache"))
    train, val = split_text(text, cfg.val_fraction)
    io.write_text(out / "train.txt", train)
    io.write_text(out / "val.txt", val)
    io.write_json(out / "meta.json", {**provenance, "train_chars": len(train),
                                      "val_chars": len(val)})
    print(f"prepare: {len(train):,} train / {len(val):,} val characters -> {out}")


if __name__ == "__main__":
    cli()
