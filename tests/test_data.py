"""Calibration data: deterministic windows from files, folders and tables, read only as far as needed; linear
packing; clear errors for bad data."""

import json
import time
from pathlib import Path

import pytest
import torch

from minipuzzle.data import (
    POOL_FACTOR,
    TEXT_CHUNK_CHARS,
    head_split,
    iter_documents,
    pack,
    split_text,
    token_windows,
)
from minipuzzle.errors import UserError

# ---- the algorithm before streaming (whole text tokenized, every window built), kept as a reference ----------


def _old_pack(token_lists, seq_len):
    buf = []
    for ids in token_lists:
        buf.extend(ids)
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]


def _old_all_windows(texts, tokenizer, seq_len):
    docs = (tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts)
    return torch.tensor(list(_old_pack(docs, seq_len)), dtype=torch.long).reshape(-1, seq_len)


def _old_token_windows(texts, tokenizer, seq_len, num_samples, seed):
    data = _old_all_windows(texts, tokenizer, seq_len)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data[order if num_samples is None else order[:num_samples]]


def _old_head_split(texts, tokenizer, seq_len, num_head, num_rest, seed):
    windows = _old_all_windows(texts, tokenizer, seq_len)
    n_head = min(num_head, max(1, len(windows) // 4))
    rest = windows[n_head:]
    return windows[:n_head], rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:num_rest]]


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


def test_windows_equal_the_full_read_when_the_pool_holds_them_all(text_file, tokenizer, tmp_path):
    text = text_file.read_text()
    assert len(text) < TEXT_CHUNK_CHARS  # one piece: tokenized exactly as the whole document was
    n_all = len(_old_all_windows([text], tokenizer, 32))
    for n, seed in [(None, 0), (n_all // POOL_FACTOR + 1, 5), (n_all, 2), (10 * n_all, 1)]:
        want = _old_token_windows([text], tokenizer, 32, n, seed)
        assert torch.equal(token_windows(text_file, tokenizer, 32, n, seed), want), (n, seed)
    for n_head, n_rest in [(8, n_all), (16, n_all // POOL_FACTOR)]:
        head, rest = head_split(text_file, tokenizer, 32, n_head, n_rest, seed=3)
        old_head, old_rest = _old_head_split([text], tokenizer, 32, n_head, n_rest, seed=3)
        assert torch.equal(head, old_head) and torch.equal(rest, old_rest)
    # A folder: file by file, in name order, each file a document.
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [text[:9000], text[9000:20000], text[20000:]]
    for i, t in enumerate(texts):
        (folder / f"{i}.txt").write_text(t)
    n = len(_old_all_windows(texts, tokenizer, 32)) // POOL_FACTOR + 1
    assert torch.equal(token_windows(folder, tokenizer, 32, n, 4), _old_token_windows(texts, tokenizer, 32, n, 4))


def test_a_bounded_pool_still_spreads_the_sample(text_file, tokenizer):
    every = _old_all_windows([text_file.read_text()], tokenizer, 32)
    n = 20
    got = token_windows(text_file, tokenizer, 32, n, seed=7)
    assert torch.equal(got, token_windows(text_file, tokenizer, 32, n, seed=7))
    index = {tuple(w.tolist()): i for i, w in enumerate(every)}
    picked = [index[tuple(w.tolist())] for w in got]
    assert len(set(picked)) == n and max(picked) < POOL_FACTOR * n  # from the pool of the first 4n windows
    assert max(picked) >= n  # not just the first n
    head, rest = head_split(text_file, tokenizer, 32, 8, 10, seed=1)
    assert torch.equal(head, every[:8])
    after = [index[tuple(w.tolist())] for w in rest]
    assert min(after) >= 8 and max(after) < 8 + POOL_FACTOR * 10 and max(after) >= 8 + 10


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


def test_pieces_depend_only_on_the_text(text_file, tokenizer):
    text = text_file.read_text() * 3
    pieces = list(split_text([text], 3000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 3000
    for size in (1, 1000, 4096, 10**6):
        reads = [text[i : i + size] for i in range(0, len(text), size)]
        assert list(split_text(reads, 3000)) == pieces
    # Cut at the start of an unindented line: the byte-level tokenizer gives the whole document's tokens.
    assert all(p.endswith("\n") for p in pieces[:-1])
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]] == whole
    # No line break at all: hard cuts at the limit.
    assert list(split_text(["x" * 7000], 3000)) == ["x" * 3000, "x" * 3000, "x" * 1000]


def test_tables_stream_the_same_windows(tmp_path, tokenizer, text_file):
    lines = text_file.read_text().splitlines()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"body": "\n".join(lines[i : i + 40])}) for i in range(0, len(lines), 40)))
    streamed = token_windows(rows, tokenizer, 32, 30, 1, column="body")
    assert torch.equal(streamed, token_windows(rows, tokenizer, 32, 30, 1, column="body", streaming=False))
    table = tmp_path / "rows.csv"
    table.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="no column 'text'"):
        token_windows(table, tokenizer, 32, 4)  # a streamed csv knows its columns only from its first row


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_score_reads_a_small_prefix_of_a_200mb_file(tmp_path, tiny_model, tokenizer, text_file):
    from minipuzzle.score.folder import score_to_folder
    from minipuzzle.settings import ScoreSettings
    from minipuzzle.testing import save_model

    if not Path("/proc/self/io").is_file():
        pytest.skip("counting the bytes a process reads needs Linux's /proc/self/io")
    big = tmp_path / "big.txt"
    block = text_file.read_bytes()
    with open(big, "wb") as f:
        for _ in range(200 * 2**20 // len(block) + 1):
            f.write(block)
    ckpt = save_model(tiny_model, tmp_path / "ckpt", tokenizer=tokenizer)
    settings = ScoreSettings(seq_len=32, depth_samples=4, width_samples=8)
    kw = {"axes": ["depth", "ffn"], "plots": False, "progress": False}
    score_to_folder(ckpt, str(text_file), tmp_path / "warm", settings, **kw)  # imports and lazy loads done
    before = _bytes_read()
    scores = score_to_folder(ckpt, str(big), tmp_path / "scores", settings, **kw)
    read = _bytes_read() - before
    big.unlink()
    assert read < 2**20, f"read {read / 2**20:.1f} MiB of a {200} MiB file"
    assert scores.meta.data["windows_available_or_requested"] == 8


class _Seen(Exception):
    pass


@pytest.mark.parametrize("streaming", [False, True, None])
def test_recipe_data_streaming_reaches_every_stage(streaming, tmp_path, tiny_model, tokenizer, text_file, monkeypatch):
    import minipuzzle.data
    from minipuzzle import runner
    from minipuzzle.recipe import parse_recipe
    from minipuzzle.testing import save_model

    seen = []

    def reader(*args, streaming="not passed", **kwargs):  # stands in for token_windows / head_split
        seen.append(streaming)
        raise _Seen

    import minipuzzle.evaluate.runner
    import minipuzzle.prune.windows
    import minipuzzle.score.folder

    # Each stage's own name for the readers (its module imports them at load).
    for module in (minipuzzle.data, minipuzzle.score.folder, minipuzzle.prune.windows, minipuzzle.evaluate.runner):
        for name in ("token_windows", "head_split"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, reader)
    teacher = save_model(tiny_model, tmp_path / "teacher", tokenizer=tokenizer)
    recipe = parse_recipe({"name": "t", "model": {"source": str(teacher)}, "prune": {"target": "0.8"},
                           "data": {"source": str(text_file), "streaming": streaming}, "distill": {"max_steps": 1}})  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "prune").symlink_to(teacher)  # eval's first model
    data = runner.prepare_data(recipe, run_dir / "data")
    for stage in (runner._score, runner._prune, runner._eval):
        with pytest.raises(_Seen):
            stage(recipe, teacher, data, run_dir / "score" if stage is runner._score else run_dir, False)
    assert seen == [streaming] * 3
    assert runner.distill_settings(recipe, teacher, data, run_dir, False).streaming is (streaming is not False)
    # The distill section's own setting wins.
    own = parse_recipe(recipe.model_dump() | {"distill": {"max_steps": 1, "streaming": True}})
    assert runner.distill_settings(own, teacher, data, run_dir, False).streaming is True
