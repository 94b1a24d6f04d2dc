"""Tokenizers: exact round trips, vocab size honoured, token arrays readable."""

from __future__ import annotations

import numpy as np

from models.data.stories import generate_corpus
from models.data.tokens import (
    BPECodec,
    CharCodec,
    TokenStream,
    load_codec,
    read_tokens,
    write_tokens,
)

TEXT = generate_corpus(400, 3) + "Unicode too: café, naïve, 東京 ✓\n"


def test_bpe_round_trip_and_vocab_size(tmp_path) -> None:
    codec = BPECodec.train(TEXT, 400)
    assert codec.vocab_size == 400
    ids = codec.encode(TEXT)
    assert codec.decode(ids) == TEXT
    assert len(ids) < len(TEXT) / 2  # merges actually compress
    codec.save(tmp_path / "tok.json")
    again = load_codec(tmp_path / "tok.json")
    assert again.encode(TEXT) == ids


def test_bpe_handles_unseen_bytes() -> None:
    codec = BPECodec.train(generate_corpus(100, 0), 300)
    unseen = "Ωmega ☃ \t tabs"
    assert codec.decode(codec.encode(unseen)) == unseen


def test_char_round_trip(tmp_path) -> None:
    codec = CharCodec.train(TEXT)
    assert codec.decode(codec.encode(TEXT)) == TEXT
    codec.save(tmp_path / "c.json")
    assert load_codec(tmp_path / "c.json").encode("Lily") == codec.encode("Lily")


def test_token_file_and_stream_position(tmp_path) -> None:
    ids = list(range(300)) * 3
    write_tokens(tmp_path / "t.bin", ids)
    arr = read_tokens(tmp_path / "t.bin")
    assert arr.dtype == np.uint16 and arr.tolist() == ids
    stream = TokenStream(arr, block_size=8, batch_size=4, seed=0)
    stream.next_batch("cpu")
    state = stream.state_dict()
    x1, y1 = stream.next_batch("cpu")
    stream.load_state_dict(state)
    x2, _ = stream.next_batch("cpu")
    assert (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all()
