"""Bytes measured from PyTorch's CPU allocator, for tests that compare the memory plan's terms with what the code
really allocates (never with the plan's own formulas)."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_allocated(fn) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator while `fn()` runs, above what was allocated before it: every
    allocation and free the profiler records, summed in time order. Tensors that `fn` returns count until the end."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_storages(fn, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while `fn()` runs (storages of `exclude`,
    e.g. parameters, left out)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
