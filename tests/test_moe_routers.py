"""MoE routers keep float32 wherever transformers keeps it (`gate.weight`, `e_score_correction_bias` in a bf16
model): sigmoid scores plus a small correction bias choose the experts, and bf16 rounding of either changes which
are chosen. Checked on a bf16 tiny MoE checkpoint made by transformers itself (`from_pretrained(dtype=bf16)`):
streamed, offloaded and in-memory forwards route alike; distillation saves the routers as the source stores them
and computes router logits in float32 under its bf16 autocast."""

import json
from contextlib import contextmanager

import pytest
import torch

from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.distill.toy import make_pair
from minipuzzle.testing import run_cli, save_model, tiny_moe_layout

ROUTER = ".mixer.gate."


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, tokenizer):
    """teacher/ and student/ ("ME*EM-" and "ME*E-") in bfloat16 as transformers loads them (routers float32),
    and data.txt."""
    from transformers import NemotronHForCausalLM

    root = tmp_path_factory.mktemp("bf16moe")
    teacher, student, data = make_pair(root / "f32", tokenizer, layout=tiny_moe_layout(), drop=(4,))
    out = []
    for src in (teacher, student):
        model = NemotronHForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        out.append(save_model(model, root / src.name, tokenizer=tokenizer))
    return out[0], out[1], data


def test_the_bf16_checkpoint_stores_float32_routers(bf16_pair):
    """The premise of the other tests: transformers keeps four router tensors of this model in float32."""
    ckpt = Checkpoint(bf16_pair[0])
    dtypes = {k: ckpt.get(k).dtype for k in ckpt.keys()}
    router = [k for k in dtypes if ROUTER in k]
    assert len(router) == 4 and {dtypes[k] for k in router} == {torch.float32}
    assert {dt for k, dt in dtypes.items() if k not in router} == {torch.bfloat16}


def _record_routing(gates, sink: dict) -> list:
    """Forward hooks appending each router's chosen experts (sorted per token, [n, k]) to sink[layer]."""
    return [g.register_forward_hook(lambda _m, _a, out, i=i: sink.setdefault(i, []).append(out[2].sort(-1).values))
            for i, g in gates]  # fmt: skip


def _moe_gates(model) -> list:
    return [(i, layer.mixer.gate) for i, layer in enumerate(model.model.layers) if layer.block_type == "moe"]


@torch.no_grad()
def test_streamed_offloaded_and_in_memory_forwards_route_alike_in_bf16(bf16_pair):
    """2048 tokens through the two MoE layers: with bf16 routers a few tokens (about 0.2 %) pick another expert
    set and the final states drift by more than 1; with float32 routers all three ways compute the same model."""
    from minipuzzle.evaluate.placement import load_offloaded
    from minipuzzle.score.layerwise import StreamedStack, iter_layerwise

    path = bf16_pair[0]
    ids = torch.randint(0, 320, (16, 128), generator=torch.Generator().manual_seed(0))
    batches = ids.split(8)

    def whole(model, sink):
        _record_routing(_moe_gates(model), sink)
        return torch.cat([model.model(b, use_cache=False).last_hidden_state for b in batches])

    mem_routes, off_routes, st_routes = {}, {}, {}
    mem = whole(load_model(path, torch.bfloat16), mem_routes)
    off = whole(load_offloaded(path, torch.bfloat16, torch.device("cpu")), off_routes)

    @contextmanager
    def on_block(i, block):
        hooks = _record_routing([(i, block.mixer.gate)], st_routes) if block.block_type == "moe" else []
        yield
        for h in hooks:
            h.remove()

    stack = StreamedStack.open(path, dtype=torch.bfloat16)
    streamed = torch.cat([hn for _, hn in iter_layerwise(stack, ids, batch_size=8, on_block=on_block)])

    assert mem.dtype == streamed.dtype == off.dtype == torch.bfloat16
    assert sorted(mem_routes) == sorted(st_routes) == sorted(off_routes) == [1, 3]
    for i in mem_routes:
        want = torch.cat(mem_routes[i])
        assert want.shape == (16 * 128, 2)
        assert torch.equal(torch.cat(st_routes[i]), want), f"layer {i}: streamed routing differs"
        assert torch.equal(torch.cat(off_routes[i]), want), f"layer {i}: offloaded routing differs"
    # Same experts, same weights, same code: only the order of bf16 sums may differ.
    for got in (streamed, off):
        torch.testing.assert_close(got.float(), mem.float(), atol=0.05, rtol=0.02)


def test_a_streamed_block_holds_its_router_in_float32_and_the_rest_in_the_stack_dtype(bf16_pair):
    from minipuzzle.score.layerwise import StreamedStack

    stack = StreamedStack.open(bf16_pair[0], dtype=torch.bfloat16)
    with stack.block(1) as block:
        dtypes = {n: t.dtype for n, t in [*block.named_parameters(), *block.named_buffers()]}
    assert {n for n, dt in dtypes.items() if dt == torch.float32} == {"mixer.gate.weight",
                                                                      "mixer.gate.e_score_correction_bias"}  # fmt: skip
    assert {dt for n, dt in dtypes.items() if not n.startswith("mixer.gate.")} == {torch.bfloat16}


def test_distilling_a_bf16_student_saves_float32_routers_unchanged_at_zero_lr(bf16_pair, tmp_path):
    """At an LR of 1e-30 (the smallest the CLI takes above 0: AdamW moves a weight by about the LR, far below half
    an ulp of any weight here) distillation changes no weight: the saved checkpoint equals the source bit for bit,
    each tensor in its stored dtype (float32 routers, bf16 elsewhere)."""
    teacher, student, data = bf16_pair
    out = tmp_path / "out"
    code, _, err = run_cli(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                            "-o", str(out), "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                            "--lr", "1e-30", "--warmup", "0", "--save-every", "0", "--eval-every", "0",
                            "--no-progress"])  # fmt: skip
    assert code == 0, err[-2000:]
    src, saved = Checkpoint(student), Checkpoint(out)
    assert sorted(saved.keys()) == sorted(src.keys())
    router = [k for k in src.keys() if ROUTER in k]
    assert len(router) == 4
    for k in src.keys():
        a, b = src.get(k), saved.get(k)
        assert b.dtype == a.dtype, k
        assert torch.equal(a, b), k
    assert all(saved.get(k).dtype == torch.float32 for k in router)
    assert saved.config.dtype == torch.bfloat16


def test_router_logits_are_float32_under_distillations_bf16_autocast(bf16_pair, tmp_path):
    """The distillation's models (teacher bf16, student float32 masters) under bf16 autocast (CPU autocast here,
    CUDA's on GPUs): autocast would run the router's linear in bf16; every router's logits are float32 and equal
    the float32 product of its input and weight."""
    from minipuzzle.distill import loop, parallel
    from minipuzzle.settings import DistillSettings

    teacher, student, data = bf16_pair
    cfg = DistillSettings(teacher=str(teacher), student=str(student), data=str(data), output=str(tmp_path / "o"),
                          teacher_dtype="bfloat16", max_steps=1, seq_len=32, batch_size=2)  # fmt: skip
    objective = loop._load_models(cfg, Checkpoint(teacher), Checkpoint(student), parallel.Dist())
    seen = []

    def check(module, args, out):
        x = args[0].reshape(-1, module.hidden_dim)
        with torch.autocast("cpu", enabled=False):
            want = torch.nn.functional.linear(x.float(), module.weight.float())
        seen.append((out[0].dtype, torch.equal(out[0], want), x.dtype))

    for model in (objective.student, objective.teacher):
        for _, gate in _moe_gates(model):
            gate.register_forward_hook(check)
    ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective.train()(ids)
    out["loss"].backward()
    assert len(seen) == 4  # two MoE layers in each model
    assert all(dt == torch.float32 and equal for dt, equal, _ in seen), seen
    assert torch.bfloat16 in {x_dtype for *_, x_dtype in seen}  # autocast was on: the teacher's stream is bf16
    assert all(p.grad is not None for n, p in objective.student.named_parameters() if n.endswith("gate.weight"))


def test_fsdp2_gathers_the_routers_in_float32_where_the_students_blocks_gather_in_bf16(monkeypatch):
    """`parallel.shard` with the GPU policy (bf16 gathers) on a one-rank gloo group: the experts compute on bf16
    weights, every router on its float32 weight, with float32 logits under autocast; its gradient is float32."""
    import socket

    import torch.distributed as dist

    from minipuzzle.distill import parallel
    from minipuzzle.distill.losses import DistillObjective
    from minipuzzle.distill.routers import route_in_float32
    from minipuzzle.testing import random_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        teacher = random_model(tiny_moe_layout(), seed=0).to(torch.bfloat16)
        student = random_model(tiny_moe_layout(pattern="EE"), seed=0)  # two MoE layers
        objective = DistillObjective(student, teacher, chunk=100).train()
        assert route_in_float32(student) == route_in_float32(teacher) == 2
        parallel.shard(objective, parallel.Dist(0, 1, torch.device("cpu")), "full", torch.bfloat16)
        seen = []
        for layer in student.model.layers:
            layer.mixer.gate.register_forward_hook(lambda m, _a, out: seen.append(("gate", m.weight.dtype, out[0].dtype)))
            layer.mixer.experts.register_forward_pre_hook(lambda m, _a: seen.append(("experts", m.up_proj.dtype)))
        ids = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = objective(ids)
        out["loss"].backward()
        assert seen == [("gate", torch.float32, torch.float32), ("experts", torch.bfloat16)] * 2
        grads = [p.grad for n, p in student.named_parameters() if n.endswith("gate.weight")]
        assert len(grads) == 2 and all(g.dtype == torch.float32 and g.full_tensor().abs().sum() > 0 for g in grads)
    finally:
        dist.destroy_process_group()


@contextmanager
def _router_calls():
    """Every MoE router forward in this process while open: (weight dtype, bias dtype, logits dtype)."""
    from minipuzzle.distill.routers import is_router

    calls = []

    def hook(module, _args, out):
        if is_router(module):
            calls.append((module.weight.dtype, module.e_score_correction_bias.dtype, out[0].dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def _cli_routing_float32(args: list[str]) -> None:
    """Run `minipuzzle ARGS` in this process; it must succeed and route only on float32 weights and logits."""
    with _router_calls() as calls:
        code, _, err = run_cli(args)
    assert code == 0, err[-2000:]
    assert calls and set(calls) == {(torch.float32,) * 3}, (args[0], set(calls))


def _stored_dtypes(path) -> tuple[set, set]:
    """(dtypes of the router tensors, dtypes of every other tensor) as stored in the checkpoint at `path`."""
    ckpt = Checkpoint(path)
    router = {ckpt.stored_dtype(k) for k in ckpt.keys() if ROUTER in k}
    return router, {ckpt.stored_dtype(k) for k in ckpt.keys() if ROUTER not in k}


def test_a_bf16_moe_checkpoint_keeps_float32_routers_through_the_pipeline(bf16_pair, tmp_path):
    """The scale rehearsal's MoE leg in miniature: score (streamed), search, cut, prune (streamed ranking),
    distill and eval of a bf16 MoE teacher. Every stage routes on float32 router weights and logits, every
    checkpoint written stores its routers in float32 and the rest in bf16, and streamed ranking measures each
    candidate exactly as in-memory ranking does (with bf16 routers, streamed agreement was off by up to 0.008)."""
    teacher, _, data = bf16_pair
    axes = ["--axes", "depth,experts", "--target", "0.8"]
    _cli_routing_float32(["score", str(teacher), "--data", str(data), "--stream", "--dtype", "bfloat16",
                          "--seq-len", "32", "--samples", "4", "--axes", "depth,experts", "--no-plots",
                          "-o", str(tmp_path / "scores")])  # fmt: skip
    code, _, err = run_cli(["search", str(teacher), "--scores", str(tmp_path / "scores"), *axes,
                            "-o", str(tmp_path / "layout.yaml")])  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(["cut", str(teacher), "--plan", str(tmp_path / "layout.yaml"), "-o", str(tmp_path / "cut")])
    assert code == 0, err
    assert _stored_dtypes(tmp_path / "cut") == ({torch.float32}, {torch.bfloat16})

    reports = {}
    for mode in ("--stream", "--no-stream"):
        out = tmp_path / f"pruned{mode}"
        _cli_routing_float32(["prune", str(teacher), "--scores", str(tmp_path / "scores"), *axes, mode,
                              "--dtype", "bfloat16", "--data", str(data), "--seq-len", "32", "--held-out-windows", "8",
                              "--candidates", "2", "-o", str(out)])  # fmt: skip
        reports[mode] = json.loads((out / "prune_report.json").read_text())
        assert _stored_dtypes(out) == ({torch.float32}, {torch.bfloat16})
    assert reports["--stream"]["streamed"] and not reports["--no-stream"]["streamed"]
    streamed, in_memory = reports["--stream"]["candidates"], reports["--no-stream"]["candidates"]
    assert len(streamed) == len(in_memory) == 2
    for a, b in zip(streamed, in_memory):
        assert (a["layers"], a["widths"]) == (b["layers"], b["widths"])
        for k in ("kl_to_teacher", "agreement", "loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), k

    student, out = tmp_path / "pruned--stream", tmp_path / "distilled"
    _cli_routing_float32(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                          "-o", str(out), "--max-steps", "2", "--seq-len", "32", "--batch-size", "2",
                          "--save-every", "0", "--eval-every", "0", "--teacher-dtype", "bfloat16",
                          "--no-progress"])  # fmt: skip
    assert _stored_dtypes(out) == ({torch.float32}, {torch.bfloat16})
    _cli_routing_float32(["eval", str(out), "--teacher", str(teacher), "--data", str(data), "--seq-len", "24",
                          "--held-out-windows", "3", "--no-speed", "--dtype", "bfloat16", "-o", str(tmp_path / "report")])  # fmt: skip
