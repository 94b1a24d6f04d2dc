"""Task generators: offline, deterministic from their seed, standard shapes; CIFAR checks."""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.ff.mlp import phi
from models.ff.tasks.cifar10 import BATCHES, CIFAR10Error, load_cifar10
from models.ff.tasks.ladder import make_ladder
from models.ff.tasks.mnist1d import load_mnist1d


def test_mnist1d_standard_split_deterministic_and_rng_neutral() -> None:
    np.random.seed(7)
    random.seed(7)
    before = np.random.rand(), random.random()
    np.random.seed(7)
    random.seed(7)
    a = load_mnist1d()
    assert (np.random.rand(), random.random()) == before
    assert a.x_train.shape == (4000, 40) and a.x_test.shape == (1000, 40)
    assert set(a.y_train.tolist()) == set(range(10))
    b = load_mnist1d()
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_phi_ladder_endpoints() -> None:
    z = torch.linspace(-3, 3, 11)
    assert torch.equal(phi(z, 0.0), z)
    torch.testing.assert_close(phi(z, 1.0), torch.tanh(z))


@pytest.mark.parametrize("a", [0.0, 1.0])
def test_ladder_deterministic_and_balanced(a: float) -> None:
    s1 = make_ladder(a, 4, n_train=2000, n_test=500, seed=3)
    s2 = make_ladder(a, 4, n_train=2000, n_test=500, seed=3)
    s3 = make_ladder(a, 4, n_train=2000, n_test=500, seed=4)
    assert torch.equal(s1.x_train, s2.x_train) and torch.equal(s1.y_train, s2.y_train)
    assert not torch.equal(s1.y_train, s3.y_train)
    assert s1.x_train.shape == (2000, 128)
    counts = torch.bincount(s1.y_train, minlength=10)
    assert counts.min() > 0.02 * 2000


def fake_cifar(root: Path) -> Path:
    rng = np.random.default_rng(0)
    tar_path = root / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name in BATCHES:
            d = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 4).tolist()}
            raw = pickle.dumps(d)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return tar_path


def test_cifar10_tarball_checksum_and_errors(tmp_path: Path) -> None:
    tar_path = fake_cifar(tmp_path)
    digest = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    s = load_cifar10(tar_path, digest)
    assert s.x_train.shape == (20, 3072) and s.x_test.shape == (4, 3072)
    with pytest.raises(CIFAR10Error, match=str(tar_path)):
        load_cifar10(tar_path, "0" * 64)
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(CIFAR10Error, match=str(missing)):
        load_cifar10(missing, digest)


def test_cifar10_extracted_directory(tmp_path: Path) -> None:
    with tarfile.open(fake_cifar(tmp_path)) as tar:
        tar.extractall(tmp_path, filter="data")
    d = tmp_path / "cifar-10-batches-py"
    h = hashlib.sha256()
    for name in BATCHES:
        h.update((d / name).read_bytes())
    s = load_cifar10(d, h.hexdigest(), flatten=False)
    assert s.x_train.shape == (20, 3, 32, 32)
