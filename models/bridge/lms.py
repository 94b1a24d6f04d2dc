"""The bridge study's two language models: a character-level source that reads the question and
a word-level target that answers it (METHODS §4: small causal LMs with different tokenizers and
widths, standing in for log 004's Llama and Mistral).

- The source is pretrained on ``Question: <q>``: its hidden states at a chosen layer are what
  the bridge maps into the target's embedding space.
- The target is pretrained on ``Question: <q> Answer: <a> . <statement>``, so that from text
  alone it answers and restates the answer with the question's person and object (the text
  baseline; log 004's Mistral scored 0 there, so its table had no working upper reference).
  The bridged target sees ``<soft tokens> Answer:`` instead of the question and must continue the
  same way.

Pretraining is plain backprop (AdamW, warm-up + cosine), a pure function of the config and seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from models.bridge.corpus import Problem
from models.config.bridge import BridgeLMConfig
from models.data.tokens import CharCodec, WordCodec
from models.nets.transformer import TransformerLM, TransformerShape
from models.training.schedule import lr_at

PRIMER = "Answer:"  # what follows the question (or the soft tokens) in training and evaluation
PAD = -100  # target index of padding positions (ignored by the loss)


def source_text(p: Problem) -> str:
    return f"Question: {p.question}"


def target_text(p: Problem, primer: str = PRIMER) -> str:
    return f"Question: {p.question} {primer} {p.answer} . {p.statement}"


def build_codecs(problems: Sequence[Problem]) -> tuple[CharCodec, WordCodec]:
    """(source codec, target codec) from the training problems' texts."""
    return (CharCodec.train("".join(source_text(p) for p in problems)),
            WordCodec.train(" ".join(target_text(p) for p in problems)))


def encode_batch(codec: CharCodec | WordCodec, texts: Sequence[str], block_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], next-token targets [B, T]) right-padded to the longest text; padding
    positions have target ``PAD``. A text longer than block_size + 1 tokens is an error (the
    config's block is too short for the corpus)."""
    ids = [codec.encode(t) for t in texts]
    longest = max(len(i) for i in ids)
    if longest > block_size + 1:
        raise ValueError(f"a text of {longest} tokens does not fit block_size {block_size} "
                         "(+1 for the shifted target); raise the LM's block_size")
    t = longest - 1
    x = torch.zeros(len(ids), t, dtype=torch.long)
    y = torch.full((len(ids), t), PAD, dtype=torch.long)
    for row, seq in enumerate(ids):
        n = len(seq) - 1
        x[row, :n] = torch.tensor(seq[:-1])
        y[row, :n] = torch.tensor(seq[1:])
    return x, y


def pretrain(cfg: BridgeLMConfig, codec: CharCodec | WordCodec, texts: Sequence[str], seed: int,
             device: torch.device) -> tuple[TransformerLM, list[float]]:
    """A fresh LM trained on ``texts`` (random batches with replacement); returns it in eval
    mode and the training loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TransformerLM(TransformerShape(codec.vocab_size, cfg.block_size, cfg.n_embd,
                                           cfg.n_head, cfg.n_layer)).to(device)
    tc = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    losses = []
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        pick = torch.randint(len(texts), (tc.batch_size,), generator=gen).tolist()
        x, y = encode_batch(codec, [texts[i] for i in pick], cfg.block_size)
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


@torch.no_grad()
def greedy(model: TransformerLM, prefix: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation of ``steps`` tokens after input vectors ``prefix`` [B, T, C] (token
    embeddings, soft tokens, or both): returns the ids [B, steps]."""
    out = []
    h = prefix
    for _ in range(steps):
        nxt = model.forward_embeddings(h)[:, -1].argmax(-1)
        out.append(nxt)
        h = torch.cat([h, model.tok(nxt)[:, None]], dim=1)
    return torch.stack(out, dim=1)


def decode_answer(codec: WordCodec, ids: Sequence[int]) -> str:
    """An output's text up to (not including) the statement's closing full stop."""
    words = codec.decode(list(ids)).split(" ")
    full_stops = [i for i, w in enumerate(words) if w == "."]
    end = full_stops[1] if len(full_stops) > 1 else len(words)
    return " ".join(words[:end])


def answer_steps(problems: Sequence[Problem], codec: WordCodec) -> int:
    """Tokens to generate: the longest answer + statement in ``problems``, plus two."""
    return max(len(codec.encode(f"{p.answer} . {p.statement}")) for p in problems) + 2


@torch.no_grad()
def text_answers(target: TransformerLM, codec: WordCodec, problems: Sequence[Problem],
                 device: torch.device, primer: str = PRIMER) -> list[str]:
    """The text baseline: the target reads ``Question: <q> <primer>`` and continues greedily.
    Prompts of different lengths are decoded one length-group at a time (no padding inside a
    causal prompt)."""
    steps = answer_steps(problems, codec)
    outputs: list[str] = [""] * len(problems)
    prompts = [codec.encode(f"Question: {p.question} {primer}") for p in problems]
    for length in sorted({len(p) for p in prompts}):
        rows = [i for i, p in enumerate(prompts) if len(p) == length]
        ids = torch.tensor([prompts[i] for i in rows], device=device)
        gen = greedy(target, target.tok(ids), steps)
        for i, g in zip(rows, gen.tolist(), strict=True):
            outputs[i] = decode_answer(codec, g)
    return outputs
