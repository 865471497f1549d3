"""The one table of number formats (`checkpoint.dtypes`) against torch and safetensors themselves: bytes and bits
per element as torch allocates them, header codes as safetensors writes them, names as torch spells them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from minipuzzle.checkpoint.dtypes import (
    DTYPE_NAMES,
    PRECISIONS,
    STORED,
    code_dtype,
    dtype_bytes,
    long_name,
    parse_dtype,
    short_name,
    stored_bytes,
)
from minipuzzle.checkpoint.read import read_header
from minipuzzle.errors import UserError


@pytest.mark.parametrize("name", DTYPE_NAMES[1:])
def test_compute_names_are_torch_dtypes_of_the_bytes_torch_allocates(name):
    dt = parse_dtype(name)
    assert str(dt) == f"torch.{long_name(name)}"
    assert parse_dtype(short_name(name)) == dt and parse_dtype(name.upper()) == dt
    assert dtype_bytes(name) == torch.empty(3, dtype=dt).element_size() == torch.empty(3, dtype=dt).nbytes // 3


def test_precision_bits_are_eight_per_byte_torch_allocates():
    """Every precision torch has a dtype for stores 8 bits per byte; NVFP4 (fp4) has none in torch: 4-bit values
    plus one 8-bit scale per 16, by hand 4 + 8 / 16."""
    for p in PRECISIONS:
        if p.name:
            assert p.bits == 8 * torch.empty(1, dtype=getattr(torch, p.name)).element_size(), p
        else:
            assert (p.short, p.bits) == ("fp4", 4 + 8 / 16)


def test_stored_codes_are_what_safetensors_writes(tmp_path):
    """Write one tensor of each dtype with safetensors and read its header: the code it chose maps back to the
    tensor's dtype, and the bytes per element are the tensor's."""
    tensors = {
        f"t{i}": torch.zeros(4, dtype=getattr(torch, name)) for i, name in enumerate(sorted(set(STORED.values())))
    }
    save_file(tensors, str(tmp_path / "all.safetensors"))
    codes = read_header(tmp_path / "all.safetensors")
    assert set(codes.values()) == set(STORED)
    for k, code in codes.items():
        assert code_dtype(code) == tensors[k].dtype
        assert stored_bytes(code) == tensors[k].element_size()
    assert code_dtype("F8_E5M2_NOT_A_CODE") is None


def test_unknown_dtype_is_one_line_naming_the_choices():
    with pytest.raises(UserError, match=r"unknown dtype 'float8': choose auto or one of float32, fp32, bfloat16, "
                                        r"bf16, float16, fp16$"):  # fmt: skip
        parse_dtype("float8")
    assert parse_dtype("auto", "cpu") == torch.float32 and parse_dtype(None, "cuda") == torch.bfloat16


def test_the_table_and_the_settings_load_no_torch():
    """The settings models and the MODEL resolver read the table without torch: the CLI builds its options from
    them before any command decides it needs torch."""
    import subprocess
    import sys

    code = ("import sys, minipuzzle.settings, minipuzzle.checkpoint.dtypes, minipuzzle.checkpoint.resolve; "
            "print(sorted({'torch', 'transformers', 'safetensors'} & {m.split('.')[0] for m in sys.modules}))")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
