"""What a stage hands a study besides its params: the device and where the prepared data lies.

Studies read data through a ``RunContext`` only, never by a path relative to the working
directory, so a test or a tool can point a study at any data folder without ``chdir``, and the
library holds no global state about where a run happens. The stages make one per command
(``RunContext(resolve_device(params.device))``: the prepared data under ``data/`` of the project
root, where the DAG writes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from models import io, paths
from models.data.tokens import BPECodec, CharCodec, load_codec, read_tokens


@dataclass(frozen=True)
class TokenCorpus:
    """The tokenised corpus ``stages.bpe`` wrote: vocabulary, codec and the two splits (read
    lazily, each once; the splits are memory-mapped)."""

    dir: Path

    @cached_property
    def vocab_size(self) -> int:
        return int(io.read_json(self.dir / "meta.json")["vocab_size"])

    @cached_property
    def train(self) -> np.ndarray:
        return read_tokens(self.dir / "train.bin")

    @cached_property
    def val(self) -> np.ndarray:
        return read_tokens(self.dir / "val.bin")

    @cached_property
    def codec(self) -> CharCodec | BPECodec:
        return load_codec(self.dir / "tokenizer.json")


@dataclass(frozen=True)
class RunContext:
    """The device a run computes on and the prepared-data root its study reads."""

    device: torch.device
    data: Path = field(default=paths.DATA)

    @cached_property
    def tokens(self) -> TokenCorpus:
        return TokenCorpus(paths.tokens_dir(self.data))

    @property
    def mnist1d_file(self) -> Path:
        return paths.mnist1d_file(self.data)

    @property
    def bridge_dir(self) -> Path:
        return paths.bridge_dir(self.data)
