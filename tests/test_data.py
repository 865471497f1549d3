"""Calibration data: deterministic windows from files, folders and tables; clear errors for bad data."""

import json

import pytest
import torch

from minipuzzle.data import iter_documents, token_windows
from minipuzzle.errors import UserError


def test_windows_are_deterministic_and_packed(text_file, tokenizer):
    a = token_windows(text_file, tokenizer, 64, 10, seed=3)
    b = token_windows(text_file, tokenizer, 64, 10, seed=3)
    c = token_windows(text_file, tokenizer, 64, 10, seed=4)
    assert a.shape == (10, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    everything = token_windows(text_file, tokenizer, 64, None, seed=0)
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(everything) == len(ids) // 64
    # Every window is a contiguous slice of the token stream.
    starts = {tuple(ids[i : i + 64]) for i in range(0, len(ids) - 63, 64)}
    assert all(tuple(w.tolist()) in starts for w in a)


def test_folder_include_exclude_and_tables(tmp_path, tokenizer):
    for name in ("a.txt", "b.py", "c.md"):
        (tmp_path / name).write_text(f"text of {name} " * 50)
    (tmp_path / "skip.bin").write_bytes(b"\0")
    assert len(list(iter_documents(tmp_path))) == 3
    assert len(list(iter_documents(tmp_path, exclude=["a.txt"]))) == 2
    assert list(iter_documents(tmp_path, include=["b.py"])) == [(tmp_path / "b.py").read_text()]
    with pytest.raises(UserError, match="no file"):
        list(iter_documents(tmp_path, include=["zzz.py"]))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"row {i} " * 40}) for i in range(5)))
    docs = list(iter_documents(rows, column="content"))
    assert len(docs) == 5 and docs[0].startswith("row 0")
    with pytest.raises(UserError, match="no column 'text'"):
        list(iter_documents(rows))


def test_bad_data_is_a_user_error(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty.txt"):
        token_windows(empty, tokenizer, 16, 4)
    short = tmp_path / "short.txt"
    short.write_text("x = 1")
    with pytest.raises(UserError, match="short.txt"):
        token_windows(short, tokenizer, 512, 4)
    with pytest.raises(UserError, match="not found"):
        token_windows(tmp_path / "missing.txt", tokenizer, 16, 4)
