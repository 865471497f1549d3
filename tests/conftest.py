"""Shared fixtures: tiny random Nemotron-H models saved in both weight-name styles, and a tokenizer."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    from minipuzzle.testing import make_tokenizer

    return make_tokenizer(320)


@pytest.fixture(scope="session")
def tiny_model():
    from minipuzzle.testing import random_model

    return random_model(seed=0)


@pytest.fixture(scope="session", params=["model", "backbone"])
def tiny_checkpoint(request, tmp_path_factory, tiny_model, tokenizer):
    """A tiny checkpoint on disk, sharded, in each weight-name style."""
    from minipuzzle.testing import save_model

    path = tmp_path_factory.mktemp("ckpt") / request.param
    return save_model(tiny_model, path, style=request.param, tokenizer=tokenizer, max_shard_bytes=40_000)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A few stdlib source files concatenated: real text."""
    from minipuzzle.testing import stdlib_text_files

    p = tmp_path_factory.mktemp("data") / "calib.txt"
    p.write_text("\n\n".join(f.read_text() for f in stdlib_text_files(4)))
    return p


@pytest.fixture
def one_thread():
    """One torch thread: distillation tests compare runs bit for bit and spawn processes on 2 shared cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tokenizer):
    """teacher/, student/ (teacher minus two layers) and data.txt on disk, per test module."""
    from minipuzzle.distill.toy import make_pair

    return make_pair(tmp_path_factory.mktemp("pair"), tokenizer)
