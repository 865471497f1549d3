"""Text -> token windows, deterministically, reading only as much text as the windows need.

Sources: a local .txt/.py/.md file, a folder of such files, a .jsonl/.json/.csv or .parquet file (read through
`datasets`), or a `datasets` hub name. Documents are tokenized with the checkpoint's own tokenizer, joined with
EOS and packed into windows of `seq_len` tokens; a seeded permutation of a bounded pool of the first windows picks
the windows, so the same arguments always give the same tensor.

Everything is a stream: text files are read lazily, a quarter of `TEXT_CHUNK_CHARS` characters at a time
(folders file by file), tables and hub datasets go through `datasets` with `streaming=True` unless streaming is
turned off, long documents are tokenized piece by piece, and window building stops once the pool is full. A
200 MB text file costs what its first few hundred kilobytes cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minipuzzle.errors import UserError

TEXT_SUFFIXES = {".txt", ".py", ".md", ".rst", ".text"}
TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Characters of a local text file read, and of any document tokenized, at a time. It bounds memory and the work
# done before the first window whatever a document's size: a byte-level BPE tokenizer does about 1 MB/s on one
# core, so a piece costs a fraction of a second. Pieces end at the start of a line that begins with a
# non-space character, a pre-tokenizer boundary for GPT-2 / Llama-3 style byte-level tokenizers, so piecewise
# tokens match whole-document ones there; a document shorter than this is tokenized in one piece, exactly.
TEXT_CHUNK_CHARS = 1 << 18

# `token_windows` builds at most POOL_FACTOR x num_windows windows and draws its seeded sample from that pool:
# the sample spreads over four times the text it needs (not only the first windows) while reading and
# tokenization stop there. Data with no more windows than the pool gives exactly the windows of a full read.
POOL_FACTOR = 4


def load_tokenizer(path: str | Path):
    """The tokenizer stored with a checkpoint (never remote code)."""

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}") from None


def train_bpe_tokenizer(files: Iterable[str | Path], vocab_size: int):
    """A byte-level BPE tokenizer (specials <pad>, <s>, </s>) trained on `files`; deterministic for the same files.

    For models trained here (the demo teacher, tests): real checkpoints bring their own tokenizer.
    """

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


def _read_text(path: Path) -> Iterator[str]:
    """The text of `path` in reads of a quarter of TEXT_CHUNK_CHARS characters (UTF-8, bad bytes replaced,
    newlines as \\n): a piece is cut once more than TEXT_CHUNK_CHARS characters are read, so the first piece
    costs 1.25 pieces of reading, not 2."""
    with open(path, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(TEXT_CHUNK_CHARS // 4):
            yield chunk


def _cut(buf: str, start: int, limit: int) -> int:
    """Where the piece of `buf` that starts at `start` ends (len(buf) > start + limit): after the last line break
    within `limit` characters that is followed by a non-space character, else after the last line break, else at
    `limit` characters."""
    end, fallback = start + limit, -1
    while (i := buf.rfind("\n", start, end)) >= 0:
        if not buf[i + 1].isspace():
            return i + 1
        fallback = max(fallback, i + 1)
        end = i
    return fallback if fallback > start else start + limit


def split_text(reads: Iterable[str], limit: int = TEXT_CHUNK_CHARS) -> Iterator[str]:
    """Re-cut a text given as consecutive `reads` into pieces of at most `limit` characters (see `_cut`).

    The pieces depend only on the text, not on how it was split into reads (a piece is cut only once more than
    `limit` characters follow its start), and the work is linear in the text's length.
    """
    buf, pos = "", 0
    for r in reads:
        buf = buf[pos:] + r  # the tail is under `limit` characters (for bounded reads): trimmed once per read
        pos = 0
        while len(buf) - pos > limit:
            cut = _cut(buf, pos, limit)
            yield buf[pos:cut]
            pos = cut
    if len(buf) > pos:
        yield buf[pos:]


def _raw_documents(
    source: str | Path,
    split: str,
    column: str,
    streaming: bool | None,
    exclude: Iterable[str],
    include: Iterable[str] | None,
) -> Iterator[Iterable[str]]:
    """Each document of `source` as an iterable of consecutive reads; files are opened only when iterated."""
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
            yield _read_text(f)
        return
    if p.is_file() and p.suffix in TEXT_SUFFIXES:
        yield _read_text(p)
        return
    stream = streaming is not False
    if p.is_file() and p.suffix in TABLE_SUFFIXES:
        ds = _load_dataset(TABLE_SUFFIXES[p.suffix], data_files=str(p), split="train", streaming=stream, name=src)
    elif p.suffix in TEXT_SUFFIXES | set(TABLE_SUFFIXES) or src.startswith((".", "/", "~")):
        raise UserError(f"data not found: {src}")
    elif p.exists():
        raise UserError(f"unsupported data file {src}: use .txt, .jsonl, .parquet or a folder of text files")
    else:
        ds = _load_dataset(src, split=split, streaming=stream, name=src)
    for text in _column(ds, src, column):
        yield (text,)


def _column(ds, src: str, column: str) -> Iterator[str]:
    """The non-empty strings of `column`, row by row; a missing column is a `UserError` before any row."""
    rows = iter(ds)
    names = getattr(ds, "column_names", None)
    if names is None:  # a streamed csv knows its columns only from its rows
        first = next(rows, None)
        if first is None:
            return
        names, rows = list(first), itertools.chain([first], rows)
    if column not in names:
        raise UserError(f"{src} has no column {column!r} (columns: {', '.join(names)}); pass --text-column")
    for row in rows:
        text = row.get(column)
        if isinstance(text, str) and text:
            yield text


def iter_documents(
    source: str | Path,
    split: str = "train",
    column: str = "text",
    streaming: bool | None = None,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
) -> Iterator[str]:
    """Yield documents (whole strings) from a file, folder or hub dataset, in a fixed order.

    When `source` is a folder its text files (top level, sorted by name) are the documents; `exclude` skips files
    by name (held-out files) and `include`, when given, keeps only the named files. `streaming` (None: on) reads
    tables and hub datasets through `datasets` with `streaming=True`; False loads them whole (cached, and usable
    offline once cached). Each document is held whole: `iter_document_pieces` bounds the memory of long ones.
    """
    for reads in _raw_documents(source, split, column, streaming, exclude, include):
        yield "".join(reads)


def iter_document_pieces(source: str | Path, *args, **kwargs) -> Iterator[Iterator[str]]:
    """Like `iter_documents` (same arguments), but each document is an iterator of its pieces (`split_text`), read
    lazily: consume a document's pieces before taking the next document."""
    for reads in _raw_documents(source, *_document_args(*args, **kwargs)):
        yield split_text(reads)


def _document_args(split: str = "train", column: str = "text", streaming: bool | None = None,
                   exclude: Iterable[str] = (), include: Iterable[str] | None = None) -> tuple:  # fmt: skip
    return split, column, streaming, exclude, include


def _load_dataset(path: str, *, name: str, **kwargs):
    # Imported here, not at the top: `datasets` brings pandas and pyarrow (about 85 MB of RSS in every process
    # that imports this module, each distillation rank included), and only tables and hub datasets need it.
    import datasets

    try:
        return datasets.load_dataset(path, **kwargs)
    except Exception as e:
        raise UserError(f"cannot load data {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def piece_tokens(tokenizer, pieces: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of one document given as pieces, piece by piece, then [EOS] (so windows see document ends)."""
    for piece in pieces:
        yield tokenizer(piece, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        yield [tokenizer.eos_token_id]


def tokenize_document(tokenizer, text: str) -> list[int]:
    """Token ids of the document `text` followed by EOS, tokenized in the pieces every reader here uses."""
    return [t for ids in piece_tokens(tokenizer, split_text([text])) for t in ids]


def iter_tokens(tokenizer, documents: Iterable[str]) -> Iterator[list[int]]:
    """Token ids of each document followed by EOS (so packed windows see document boundaries)."""
    for doc in documents:
        yield tokenize_document(tokenizer, doc)


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


def _first_windows(
    source: str | Path,
    tokenizer,
    seq_len: int,
    limit: int | None,
    *,
    split: str,
    column: str,
    streaming: bool | None,
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
) -> torch.Tensor:
    """The first `limit` windows of `source` (all with None), [N, seq_len] int64, reading and tokenizing no further
    than they need."""
    docs = iter_document_pieces(source, split, column, streaming, exclude, include)
    windows = pack(itertools.chain.from_iterable(piece_tokens(tokenizer, d) for d in docs), seq_len)
    try:
        # A tensor per window as it comes: 8 bytes a token, where lists of Python ints hold ~36.
        rows = [torch.tensor(w, dtype=torch.long) for w in itertools.islice(windows, limit)]
    finally:
        windows.close()  # closes the open file now, not when the generators are collected
    return torch.stack(rows) if rows else torch.zeros(0, seq_len, dtype=torch.long)


def token_windows(
    source: str | Path,
    tokenizer,
    seq_len: int,
    num_windows: int | None = None,
    seed: int = 0,
    *,
    split: str = "train",
    column: str = "text",
    exclude: Iterable[str] = (),
    include: Iterable[str] | None = None,
    max_windows: int | None = None,
    streaming: bool | None = None,
) -> torch.Tensor:
    """Windows of token ids, shape [num_windows, seq_len] (int64), chosen deterministically from `seed`.

    The first POOL_FACTOR x num_windows windows (all with `num_windows` None; at most `max_windows`) are built,
    then a seeded permutation of them picks `num_windows`; with fewer windows than asked, all are returned. Only
    the text those windows need is read. `streaming`: see `iter_documents`. Empty or too-short data is a
    `UserError` naming the source.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    limit = None if num_windows is None else POOL_FACTOR * max(num_windows, 1)
    if max_windows is not None:
        limit = max_windows if limit is None else min(limit, max_windows)
    data = _first_windows(source, tokenizer, seq_len, limit, split=split, column=column, streaming=streaming,
                          exclude=exclude, include=include)  # fmt: skip
    if not len(data):
        raise UserError(f"data {source} is empty or shorter than one window of {seq_len} tokens")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    if num_windows is not None:
        order = order[:num_windows]
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
    streaming: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(head [H, seq_len], rest [R, seq_len]): the first windows of `source` in document order, and a seeded pick
    of `num_rest` of the (at most POOL_FACTOR x `num_rest`) windows after them.

    Windows are consecutive, non-overlapping slices of one packed token stream, so no token of the head is in
    the rest. The head is what `distill` holds out of the same data (same packing, from its start) when it
    takes its evaluation windows from it: a distillation on `source` with at least H x seq_len evaluation tokens
    never trains on the head. H is `num_head`, at most a quarter of the windows (at least 1).
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    # 4 x num_head so that a full pool always holds the whole head (at most a quarter of the windows).
    limit = max(2, 4 * num_head, num_head + POOL_FACTOR * num_rest)
    windows = _first_windows(source, tokenizer, seq_len, limit, split=split, column=column, streaming=streaming)
    if len(windows) < 2:
        raise UserError(f"data {source} gives {len(windows)} window of {seq_len} tokens: need at least 2")
    n_head = min(num_head, max(1, len(windows) // 4))
    head, rest = windows[:n_head], windows[n_head:]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))[:num_rest]
    return head, rest[order]
