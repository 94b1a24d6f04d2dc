"""CIFAR-10 from a user-supplied local copy (never downloaded), verified by sha256.

``path`` is either the python-pickle tarball ``cifar-10-python.tar.gz`` (the sha256 is of that
file) or its extracted ``cifar-10-batches-py`` directory (the sha256 is then of the six batch
files ``data_batch_1..5, test_batch`` concatenated in that order). Images are scaled to [0, 1]
and standardised per channel with training-set statistics; ``flatten`` gives (N, 3072) for MLPs.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from models.ff.tasks import Split

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class CIFAR10Error(RuntimeError):
    pass


def _read_members(path: Path) -> tuple[dict[str, bytes], str]:
    h = hashlib.sha256()
    if path.is_dir():
        blobs = {}
        for name in BATCHES:
            f = path / name
            if not f.is_file():
                raise CIFAR10Error(f"CIFAR-10 batch file missing: {f}")
            blobs[name] = f.read_bytes()
            h.update(blobs[name])
        return blobs, h.hexdigest()
    raw = path.read_bytes()
    h.update(raw)
    blobs = {}
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if name in BATCHES and m.isfile():
                fh = tar.extractfile(m)
                if fh is not None:
                    blobs[name] = fh.read()
    missing = [b for b in BATCHES if b not in blobs]
    if missing:
        raise CIFAR10Error(f"{path}: tarball lacks CIFAR-10 batches {missing}")
    return blobs, h.hexdigest()


def load_cifar10(path: str | Path, sha256: str, flatten: bool = True) -> Split:
    p = Path(path).expanduser()
    if not p.exists():
        raise CIFAR10Error(f"CIFAR-10 not found at {p} (supply cifar-10-python.tar.gz or the "
                           f"extracted cifar-10-batches-py directory; nothing is downloaded)")
    blobs, digest = _read_members(p)
    if digest.lower() != sha256.lower():
        raise CIFAR10Error(f"CIFAR-10 at {p}: sha256 {digest} does not match expected {sha256}")
    xs, ys = [], []
    for name in BATCHES:
        d = pickle.loads(blobs[name], encoding="bytes")  # noqa: S301 (checksum-verified file)
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs)).float() / 255.0
    y = torch.from_numpy(np.concatenate(ys))
    n_train = 50000 if len(x) == 60000 else len(x) - len(xs[-1])
    mean = x[:n_train].mean((0, 2, 3), keepdim=True)
    std = x[:n_train].std((0, 2, 3), keepdim=True)
    x = (x - mean) / std
    if flatten:
        x = x.reshape(len(x), -1)
    return Split(x[:n_train], y[:n_train], x[n_train:], y[n_train:])
