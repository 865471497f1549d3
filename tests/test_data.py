"""Calibration data: deterministic windows from files, folders and tables; linear packing; clear errors for bad data."""

import json
import time

import pytest
import torch

from minipuzzle.data import iter_documents, pack, token_windows
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


def _old_pack(token_lists, seq_len):
    buf = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def test_pack_equals_the_old_packing(tokenizer):
    gen = torch.Generator().manual_seed(0)
    docs = [
        torch.randint(0, 300, (int(k),), generator=gen).tolist() for k in torch.randint(0, 200, (60,), generator=gen)
    ]
    for seq_len in (2, 7, 64, 500):
        assert list(pack(docs, seq_len)) == list(_old_pack(docs, seq_len))


def _cpu_seconds_to_pack(n_tokens: int, deadline: float = float("inf")) -> float:
    doc = list(range(n_tokens))
    t0 = time.process_time()
    for _ in pack([doc], 64):
        if time.process_time() - t0 > deadline:
            break
    return time.process_time() - t0


def test_pack_is_linear_in_a_documents_length():
    # One long document, 16x longer: linear packing takes ~16x the CPU time (~25x with cache misses on the longer
    # list), the old copy-the-rest loop ~256x. CPU time (not wall time) and the best of several runs keep other
    # processes' load out of it; the deadline keeps a quadratic packer from running for minutes.
    n = 100_000
    base = min(_cpu_seconds_to_pack(n) for _ in range(5))
    bound = 64 * base
    longer = min(_cpu_seconds_to_pack(16 * n, deadline=bound) for _ in range(3))
    assert longer < bound, f"16x the tokens took {longer / base:.0f}x the time"
