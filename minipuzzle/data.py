"""Text -> token windows, deterministically.

Sources: a local .txt/.py/.md file, a folder of such files, a .jsonl/.json or .parquet file (read through
`datasets`), or a `datasets` hub name. Documents are tokenized with the checkpoint's own tokenizer, joined with
EOS and packed into windows of `seq_len` tokens; a seeded permutation picks the windows, so the same arguments
always give the same tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from minipuzzle.errors import UserError

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_tokenizer(path: str | Path):
    """The tokenizer stored with a checkpoint (never remote code)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def train_bpe_tokenizer(files: Iterable[str | Path], vocab_size: int):
    """A byte-level BPE tokenizer (specials <pad>, <s>, </s>) trained on `files`; deterministic for the same files.

    For models trained here (the demo teacher, tests): real checkpoints bring their own tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _text_files(folder: Path) -> list[Path]:
    # Top level only: a folder like the Python standard library holds site-packages below it.
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)


def iter_documents(
    source: str | Path,
    split: str = "train",
    column: str = "text",
    streaming: bool = False,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
) -> Iterator[str]:
    """Yield documents (strings) from a file, folder or hub dataset, in a fixed order.

    When `source` is a folder its text files (top level, sorted by name) are the documents; `exclude` skips files
    by name (held-out files) and `include`, when given, keeps only the named files.
    """
    src = str(source)
    p = Path(src)
    if p.is_dir():
        skip = set(exclude)
        only = None if include is None else set(include)
        files = [f for f in _text_files(p) if f.name not in skip and (only is None or f.name in only)]
        if only is not None and len(files) < len(only):
            missing = sorted(only - {f.name for f in files})
            raise UserError(f"{p} has no file {missing[0]}")
        if not files:
            raise UserError(f"no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in {p}")
        for f in files:
            yield f.read_text(errors="replace")
        return
    if p.is_file() and p.suffix in TEXT_SUFFIXES:
        yield p.read_text(errors="replace")
        return
    if p.is_file() and p.suffix in TABLE_SUFFIXES:
        ds = _load_dataset(TABLE_SUFFIXES[p.suffix], data_files=str(p), split="train", streaming=streaming, name=src)
    elif p.suffix in TEXT_SUFFIXES | set(TABLE_SUFFIXES) or src.startswith((".", "/", "~")):
        raise UserError(f"data not found: {src}")
    elif p.exists():
        raise UserError(f"unsupported data file {src}: use .txt, .jsonl, .parquet or a folder of text files")
    else:
        ds = _load_dataset(src, split=split, streaming=streaming, name=src)
    names = getattr(ds, "column_names", None)
    if names is not None and column not in names:
        raise UserError(f"{src} has no column {column!r} (columns: {', '.join(names)}); pass --text-column")
    for row in ds:
        text = row.get(column)
        if isinstance(text, str) and text:
            yield text


def _load_dataset(path: str, *, name: str, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load data {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def iter_tokens(tokenizer, documents: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS (so packed windows see document boundaries)."""
    eos = tokenizer.eos_token_id
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = ids + [eos]
        yield ids


def pack(token_lists: Iterable[list[int]], seq_len: int) -> Iterator[list[int]]:
    """Concatenate token lists and cut them into consecutive windows of exactly `seq_len` tokens.

    Linear in the number of tokens: each list is appended once to the carry-over of fewer than `seq_len` tokens
    left by the previous ones, and windows are sliced at an offset.
    """
    carry: list[int] = []
    for ids in token_lists:
        buf = carry  # a list of our own (the tail sliced off the previous buffer)
        buf.extend(ids)
        full = len(buf) - len(buf) % seq_len
        for start in range(0, full, seq_len):
            yield buf[start : start + seq_len]
        carry = buf[full:]


def token_windows(
    source: str | Path,
    tokenizer,
    seq_len: int,
    num_samples: int | None = None,
    seed: int = 0,
    *,
    split: str = "train",
    column: str = "text",
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Windows of token ids, shape [num_samples, seq_len] (int64), chosen deterministically from `seed`.

    All windows are built (up to `max_windows`), then a seeded permutation picks `num_samples` of them; with fewer
    windows than asked, all are returned. Empty or too-short data is a `UserError` naming the source.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    windows = []
    for w in pack(
        iter_tokens(tokenizer, iter_documents(source, split, column, exclude=exclude, include=include)), seq_len
    ):
        windows.append(w)
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise UserError(f"data {source} is empty or shorter than one window of {seq_len} tokens")
    data = torch.tensor(windows, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    if num_samples is not None:
        order = order[:num_samples]
    return data[order]


def head_split(
    source: str | Path,
    tokenizer,
    seq_len: int,
    num_head: int,
    num_rest: int,
    seed: int = 0,
    *,
    split: str = "train",
    column: str = "text",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head [H, seq_len], rest [R, seq_len]): the first windows of `source` in document order, and a seeded pick
    of `num_rest` of the windows after them.

    Windows are consecutive, non-overlapping slices of one packed token stream, so no token of the head is in
    the rest. The head is what `distill` holds out of the same data (same packing, from its start) when it
    takes its evaluation windows from it: a distillation on `source` with at least H x seq_len evaluation tokens
    never trains on the head. H is `num_head`, at most a quarter of the windows (at least 1).
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    docs = iter_documents(source, split, column)
    windows = torch.tensor(list(pack(iter_tokens(tokenizer, docs), seq_len)), dtype=torch.long).reshape(-1, seq_len)
    if len(windows) < 2:
        raise UserError(f"data {source} gives {len(windows)} window of {seq_len} tokens: need at least 2")
    n_head = min(num_head, max(1, len(windows) // 4))
    head, rest = windows[:n_head], windows[n_head:]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:num_rest]
    return head, rest[order]
