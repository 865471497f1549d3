"""Checkpoint reading and writing: both weight-name styles, sharded and single-file, corrupt input, atomic output."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.write import atomic_dir
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.testing import run_cli, save_model

IDS = torch.randint(0, 320, (1, 23), generator=torch.Generator().manual_seed(0))


def test_reads_both_styles_lazily(tiny_model, tiny_checkpoint):
    ck = Checkpoint(tiny_checkpoint)
    sd = tiny_model.state_dict()
    assert set(ck.keys()) == set(sd)
    assert all(k.startswith(("model.", "lm_head")) for k in ck.keys())
    assert torch.equal(ck.get("model.layers.2.mixer.q_proj.weight"), sd["model.layers.2.mixer.q_proj.weight"])
    layer = ck.layer_state(0)
    assert set(layer) == {k[len("model.layers.0.") :] for k in sd if k.startswith("model.layers.0.")}
    with torch.no_grad():
        assert torch.equal(load_model(ck)(IDS, use_cache=False).logits, tiny_model(IDS, use_cache=False).logits)


def test_single_file_checkpoint(tiny_model, tmp_path):
    path = save_model(tiny_model, tmp_path / "one")
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors.index.json").exists()
    assert len(Checkpoint(path).keys()) == len(tiny_model.state_dict())


def test_embedding_stored_under_its_singular_name(tiny_model, tmp_path):
    """transformers 5.15 saves the embedding as `backbone.embedding.weight`; it loads as the embeddings."""
    from safetensors.torch import load_file, save_file

    path = save_model(tiny_model, tmp_path / "one", style="backbone")
    state = load_file(path / "model.safetensors")
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert "model.embeddings.weight" in Checkpoint(path).keys()
    with torch.no_grad():
        assert torch.equal(load_model(path)(IDS, use_cache=False).logits, tiny_model(IDS, use_cache=False).logits)


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_corrupt_and_foreign_checkpoints(tiny_checkpoint, tmp_path):
    bad = _copy(tiny_checkpoint, tmp_path / "truncated")
    shard = sorted(bad.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt"):
        Checkpoint(bad)
    garbage = _copy(tiny_checkpoint, tmp_path / "garbage")
    sorted(garbage.glob("*.safetensors"))[1].write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="corrupt"):
        Checkpoint(garbage)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    save_file({"w": torch.zeros(2)}, str(llama / "model.safetensors"))
    with pytest.raises(UserError, match="not a Nemotron-H"):
        Checkpoint(llama)
    with pytest.raises(UserError, match="not found"):
        Checkpoint(tmp_path / "missing")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not out.exists() and os.listdir(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("1")
    assert (out / "done").read_text() == "1"
    with pytest.raises(UserError, match="not empty"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("2")
    assert sorted(os.listdir(out)) == ["new"] and len(os.listdir(tmp_path)) == 1


def test_cut_command_errors_write_nothing(tiny_checkpoint, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": [0, 1, 2]}))
    out = tmp_path / "out"
    for args, needle in [
        (["cut", str(tmp_path / "missing"), "--plan", str(plan), "-o", str(out)], "not found"),
        (["cut", str(tiny_checkpoint), "--plan", str(tmp_path / "nope.json"), "-o", str(out)], "plan file"),
    ]:
        code, _, err = run_cli(args)
        assert code == 2 and needle in err and "Traceback" not in err
        assert not out.exists()
    bad = _copy(tiny_checkpoint, tmp_path / "bad")
    sorted(bad.glob("*.safetensors"))[0].write_bytes(b"\x00\x01")
    code, _, err = run_cli(["cut", str(bad), "--plan", str(plan), "-o", str(out)])
    assert code == 2 and "corrupt" in err and not out.exists()


def test_cut_command_writes_checkpoint(tiny_checkpoint, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("plan:\n  layers: [0, 1, 2, 3]\n")
    code, out, err = run_cli(["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(tmp_path / "o")])
    assert code == 0, err
    assert Checkpoint(tmp_path / "o").layout.pattern == Checkpoint(tiny_checkpoint).layout.pattern[:4]


def test_preset_name_is_not_shadowed_by_a_folder_that_is_no_checkpoint(tmp_path, monkeypatch):
    from minipuzzle.checkpoint.resolve import resolve_checkpoint
    from minipuzzle.presets import get_preset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # e.g. a folder of logs
    assert resolve_checkpoint("demo") == get_preset("demo").local_path
    code, out, err = run_cli(["info", "demo", "--json"])
    assert code == 0 and json.loads(out)["params"] == get_preset("demo").layout.num_params()


def test_kernel_fallback_warnings_are_one_plain_line_or_none(monkeypatch):
    import logging

    import torch

    from minipuzzle.checkpoint import build as checkpoint

    log = logging.getLogger("transformers.integrations.hub_kernels")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        checkpoint.plain_kernel_notice()
        checkpoint.plain_kernel_notice()  # idempotent: one filter
        fallback = "`{}` is falling back to its reference PyTorch implementation because `{}` is not installed."
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        log.warning(fallback.format("causal_conv1d_fn", "causal_conv1d"))
        log.warning("something else")
        assert seen == ["something else"]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(checkpoint._KernelNotice, "said", False)
        for fn in ("causal_conv1d_fn", "mamba_chunk_scan_combined", "selective_state_update", "causal_conv1d_update"):
            log.warning(fallback.format(fn, "mamba_ssm"))
        assert len(seen) == 2 and "mamba_ssm and causal_conv1d are not installed" in seen[1]
    finally:
        log.removeHandler(handler)


def _rss_file() -> int:
    """Bytes of file-backed pages resident in this process (/proc/self/status RssFile)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status RssFile on this system")


def test_read_tensors_do_not_stay_resident(tmp_path):
    """A tensor read from a shard is a view of its mapping: once dropped, its pages must leave the process's
    resident memory even while the Checkpoint is still in use (a cached handle kept every page read so far)."""
    save_file({f"t{i}": torch.randn(512, 4096) for i in range(8)}, str(tmp_path / "w.safetensors"))  # 64 MiB
    ck = Checkpoint.__new__(Checkpoint)  # the reader alone: no config needed
    ck.path, ck._files, ck._stored, ck._dtypes, ck._experts = tmp_path, {}, {}, {}, {}
    for i in range(8):
        ck._add(f"t{i}", tmp_path / "w.safetensors")
    before = _rss_file()
    total = sum(float(ck.get(f"t{i}").sum()) for i in range(8))  # every page touched, each tensor dropped
    assert total == total  # read for real (not NaN)
    assert _rss_file() - before < 16 * 2**20


def test_cut_writes_the_plans_shards_and_is_refused_where_it_cannot_fit(tiny_checkpoint, tmp_path):
    """The cut's output shards are the memory plan's size for the hardware (a quarter of what it may use, at
    least the largest tensor), so a small host gets several small shards; hardware too small for one tensor and
    its copy is refused in one line, nothing written."""
    from minipuzzle.memory import TOOL_BYTES, cut_memory

    plan = tmp_path / "plan.yaml"
    plan.write_text("plan:\n  layers: [0, 1, 2, 3]\n")
    src = Checkpoint(tiny_checkpoint)
    # The hardware's whole memory: the cut process's interpreter (the plan counts it) and as much as the checkpoint.
    memory = int(TOOL_BYTES / 0.9) + src.nbytes()
    shard = cut_memory(src.layout, Hardware(device="cpu", gpu_memory=memory), stored_bytes=4).geometry.shard_bytes
    # Hand count: a quarter of the 90 % usable beside the interpreter, at least the largest stored tensor (read from
    # the safetensors headers, 4 bytes an element).
    import math

    from safetensors import safe_open

    largest = 0
    for f in tiny_checkpoint.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            largest = max([largest] + [math.prod(st.get_slice(k).get_shape()) for k in st.keys()])
    assert shard == max(largest * 4, int(0.25 * (int(0.9 * memory) - TOOL_BYTES)))
    code, _, err = run_cli(["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(tmp_path / "o"),
                            "--host-memory", str(memory)])  # fmt: skip
    assert code == 0, err
    shards = sorted((tmp_path / "o").glob("*.safetensors"))
    written = sum(f.stat().st_size for f in shards)
    assert len(shards) == -(-written // shard) or len(shards) == -(-written // shard) + 1
    assert len(shards) > 1 and all(f.stat().st_size <= shard + 2**16 for f in shards)  # + the header
    code, _, err = run_cli(["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(tmp_path / "p"),
                            "--host-memory", "64KiB"])  # fmt: skip
    assert code == 2 and err.strip().startswith("error: cut does not fit") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_save_state_dict_takes_tensors_one_at_a_time(tiny_model, tmp_path):
    """The distilled student's final save hands tensors over as they are gathered: a (name, tensor) stream is
    written without being held whole (at most the shard being filled stays alive), and reads back exact."""
    import weakref

    from minipuzzle.arch import Layout
    from minipuzzle.checkpoint.write import save_state_dict

    alive, most = [], 0

    def stream():
        nonlocal most
        for k, v in tiny_model.state_dict().items():
            most = max(most, sum(r() is not None for r in alive))
            t = v.detach().clone()  # a fresh tensor, as a gather makes
            alive.append(weakref.ref(t))
            yield k, t
            del t

    out = save_state_dict(stream(), Layout.from_config(tiny_model.config), tmp_path / "s",
                          base_config=tiny_model.config, max_shard_bytes=1)  # fmt: skip
    assert most <= 1  # the one tensor in the writer's buffer
    loaded = load_model(out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_model.state_dict().items())


def test_tied_checkpoint_without_a_head_loads_the_embeddings_as_head(tmp_path):
    """A tied checkpoint may leave the LM head out: the plain and the offloaded (eval) loaders take the embeddings
    for transformers' separate head (FSDP2's fill asks the same `Checkpoint.source_of`)."""
    from minipuzzle.evaluate.placement import load_offloaded
    from minipuzzle.testing import random_model, tiny_layout

    model = random_model(tiny_layout(tie_word_embeddings=True))
    with torch.no_grad():
        model.lm_head.weight.copy_(model.model.embeddings.weight)
    path = save_model(model, tmp_path / "tied")
    sd = {k: v for k, v in load_file_all(path).items() if k != "lm_head.weight"}
    for f in path.glob("*.safetensors"):
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(sd, str(path / "model.safetensors"))
    ck = Checkpoint(path)
    assert "lm_head.weight" not in ck and ck.source_of("lm_head.weight") == "model.embeddings.weight"
    with torch.no_grad():
        want = model(IDS, use_cache=False).logits
        assert torch.equal(load_model(ck)(IDS, use_cache=False).logits, want)
        torch.testing.assert_close(load_offloaded(path, torch.float32, torch.device("cpu"))(IDS, use_cache=False).logits, want)


def load_file_all(path):
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
