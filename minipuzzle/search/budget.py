"""Budgets: a parameter count, an active-parameter count and/or an inference-memory limit, parsed from what users
type; a layout must meet every limit given.

`--target 47b` means the 47b preset's exact parameter count (46.792e9) because that preset exists; `6.5e9`,
`6.5b` and `740972` are counts; `0.8` and `80%` are fractions of the source. `--target-active 3b` limits what one
token runs through in a mixture-of-experts model (`Layout.num_active_params`), read the same way (a preset gives
its active count, a fraction is of the source's active count). `--memory 31.7GiB` is checked against
`Layout.memory(precision, context, batch, kv_precision)["total"]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import PRECISION_BITS
from minipuzzle.errors import UserError
from minipuzzle.presets import get_preset, is_preset
from minipuzzle.units import parse_bytes, parse_count_or_fraction


def parse_target(text: str | float | int, source: Layout, active: bool = False) -> int:
    """A parameter budget: a preset name (its exact count), a count (6.5e9, 6.5b, 740972) or a fraction of the
    source's parameters (0.8, 80%). With `active`, of active parameters (`Layout.num_active_params`)."""

    count = Layout.num_active_params if active else Layout.num_params
    if is_preset(str(text).strip().lower()):
        return count(get_preset(str(text).strip().lower()).layout)
    value = parse_count_or_fraction(text, "--target-active" if active else "--target")
    return value if isinstance(value, int) else int(count(source) * value)


def parse_memory(text: str | int | float) -> int:
    """--memory: '31.7GiB', '32GB', '500MiB' or a byte count -> bytes."""
    return parse_bytes(text, "--memory")


@dataclass(frozen=True)
class Budget:
    """What a pruned layout must fit: at most `params` parameters, at most `active_params` active parameters
    (those one token runs through, for mixture-of-experts models) and/or at most `memory` bytes of inference memory
    (weights at `precision`, KV cache for `context` tokens x `batch`, Mamba states)."""

    params: int | None = None
    memory: int | None = None
    precision: str = "bf16"
    context: int = 8192
    batch: int = 1
    kv_precision: str | None = None
    active_params: int | None = None

    def __post_init__(self) -> None:
        if self.params is None and self.memory is None and self.active_params is None:
            raise UserError("give a budget: --target (parameters), --target-active (active parameters) and/or --memory")
        if self.precision.lower() not in PRECISION_BITS:
            raise UserError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISION_BITS)}")
        if self.kv_precision is not None and self.kv_precision.lower() not in PRECISION_BITS:
            raise UserError(f"unknown KV precision {self.kv_precision!r}: choose one of {', '.join(PRECISION_BITS)}")
        if self.params is not None and self.params <= 0:
            raise UserError(f"parameter target must be positive, got {self.params}")
        if self.active_params is not None and self.active_params <= 0:
            raise UserError(f"active-parameter target must be positive, got {self.active_params}")
        if self.context < 1 or self.batch < 1:
            raise UserError("--context and --batch must be at least 1")

    def memory_of(self, layout: Layout) -> dict[str, int]:
        return layout.memory(self.precision, self.context, self.batch, self.kv_precision)

    def fits(self, layout: Layout) -> bool:
        """True when `layout` meets every limit (<=)."""
        if self.params is not None and layout.num_params() > self.params:
            return False
        if self.active_params is not None and layout.num_active_params() > self.active_params:
            return False
        return self.memory is None or self.memory_of(layout)["total"] <= self.memory

    def usage(self, layout: Layout) -> dict:
        """Parameters (active ones too when limited) and memory of `layout` next to the limits (JSON-ready)."""
        out = {"params": layout.num_params(), "params_limit": self.params}
        if self.active_params is not None:
            out["active_params"] = layout.num_active_params()
            out["active_params_limit"] = self.active_params
        if self.memory is not None:
            out["memory"] = self.memory_of(layout)
            out["memory_limit"] = self.memory
        return out

    def describe(self) -> str:
        parts = []
        if self.params is not None:
            parts.append(f"<= {self.params:,} parameters ({self.params / 1e9:.3f}B)")
        if self.active_params is not None:
            parts.append(f"<= {self.active_params:,} active parameters ({self.active_params / 1e9:.3f}B)")
        if self.memory is not None:
            kv = self.kv_precision or self.precision
            parts.append(
                f"<= {self.memory / 2**30:.2f} GiB at {self.precision} weights, {kv} KV, context {self.context:,}, "
                f"batch {self.batch}"
            )
        return " and ".join(parts)

    def to_dict(self) -> dict:
        """The fields as a dict; `active_params` only when set, so budgets without it read as before."""
        out = asdict(self)
        if out["active_params"] is None:
            del out["active_params"]
        return out


def make_budget(
    source: Layout,
    target: str | float | int | None = None,
    memory: str | int | None = None,
    precision: str = "bf16",
    context: int = 8192,
    batch: int = 1,
    kv_precision: str | None = None,
    target_active: str | float | int | None = None,
) -> Budget:
    """Parse the budget options and refuse a budget the source already meets (there is nothing to prune), or an
    active-parameter limit on a dense source (every parameter is active there: --target says it)."""
    if target_active is not None and not source.is_moe:
        raise UserError("--target-active limits mixture-of-experts models; this model is dense: use --target")
    params = parse_target(target, source) if target is not None else None
    active = parse_target(target_active, source, active=True) if target_active is not None else None
    mem = parse_memory(memory) if memory is not None else None
    budget = Budget(params, mem, precision, context, batch, kv_precision, active)
    if budget.fits(source):
        detail = f"{source.num_params():,} parameters"
        if active is not None:
            detail += f", {source.num_active_params():,} active"
        if mem is not None:
            detail += f", {budget.memory_of(source)['total'] / 2**30:.2f} GiB"
        raise UserError(f"the source already meets the budget ({budget.describe()}): it has {detail}")
    return budget
