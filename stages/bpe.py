"""Stage 2: train the tokenizer (byte-level BPE or characters) and write uint16 token arrays."""

from __future__ import annotations

from pathlib import Path

from models import io
from models.data.tokens import train_codec, write_tokens
from models.pipeline import text_dir, tokens_dir
from stages._cli import PARAMS_OPTION, app, clear_errors, load

cli = app(__doc__ or "")


@cli.command()
@clear_errors
def main(params: Path = PARAMS_OPTION) -> None:
    """Write data/tokens/{tokenizer.json,train.bin,val.bin,meta.json} from params `data.tokenizer`.

    The tokenizer is trained on the train split only; val is encoded with it.
    """
    cfg = load(params).data.tokenizer
    src = text_dir()
    for name in ("train.txt", "val.txt"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found; run `python -m stages.prepare`")
    train = (src / "train.txt").read_text(encoding="utf-8")
    val = (src / "val.txt").read_text(encoding="utf-8")
    codec = train_codec(cfg.kind, train, cfg.vocab_size)
    train_ids, val_ids = codec.encode(train), codec.encode(val)
    out = tokens_dir()
    codec.save(out / "tokenizer.json")
    write_tokens(out / "train.bin", train_ids)
    write_tokens(out / "val.bin", val_ids)
    io.write_json(out / "meta.json", {"kind": cfg.kind, "vocab_size": codec.vocab_size,
                                      "requested_vocab_size": cfg.vocab_size,
                                      "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                                      "dtype": "uint16"})
    print(f"bpe: {cfg.kind} vocab {codec.vocab_size}, {len(train_ids):,} train / "
          f"{len(val_ids):,} val tokens -> {out}")


if __name__ == "__main__":
    cli()
