"""What FSDP2 moves per rank per step, and the sharding the plan chooses with it: bytes against hand counts from
the parameters of real models and against what 4 gloo ranks (2 nodes x 2) really gather, reduce-scatter and
all-reduce; the choice between HSDP and full sharding flips where the arithmetic says; the 56B recipe's dry run
prices communication and recompute into its GPU-hours."""

import json
import os
import subprocess
import sys

import pytest

from minipuzzle.communication import H100_FLOPS, step_traffic
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, resolve
from minipuzzle.memory import CUDA_CONTEXT_BYTES, Fixed, train_memory
from minipuzzle.testing import random_model, run_cli, save_model, tiny_moe_layout
from minipuzzle.units import parse_bandwidth

TEACHER = tiny_moe_layout()
STUDENT = tiny_moe_layout(pattern="ME*E-", moe_intermediate_size=16)


def _counts(layout):
    """(block parameters without routers, router parameters, root parameters, the last block's parameters) of a
    real model of `layout`, counted from its tensors (no use of the layout's own parameter arithmetic)."""
    blocks = routers = root = last = 0
    for name, p in random_model(layout).named_parameters():
        if ".mixer.gate." in name:
            routers += p.numel()
        elif name.startswith("model.layers."):
            blocks += p.numel()
            last += p.numel() if name.startswith(f"model.layers.{layout.num_layers - 1}.") else 0
        else:
            root += p.numel()
    return blocks, routers, root, last


def test_bandwidths_are_read_as_links_are_quoted():
    assert parse_bandwidth("450GB/s") == 450e9
    assert parse_bandwidth("400Gb/s") == parse_bandwidth("400Gbps") == 50e9  # bits, as networks are sold
    assert parse_bandwidth("2GiB/s") == 2 * 2**30 and parse_bandwidth(5e10) == 5e10
    with pytest.raises(UserError, match="cannot read bandwidth 'fast'"):
        parse_bandwidth("fast")
    hw = Hardware(gpu_memory="80GiB", inter_node_bandwidth="200Gb/s")
    assert (hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s) == (0.8 * 450e9, 25e9)
    text = hw.bandwidth_text()
    assert "80% of H100 NVLink 4's 450 GB/s" in text and "InfiniBand" not in text  # only the assumption is named
    assert resolve(hw, {"intra_node_bandwidth": "300GB/s"}).intra_node_bytes_per_s == 300e9
    code, _, err = run_cli(["run", "demo", "--dry-run", "--inter-node-bandwidth", "fast"])
    assert code == 2 and err.strip() == "error: cannot read --inter-node-bandwidth 'fast' (examples: 450GB/s, 400Gb/s, 5e10)"


def test_bytes_and_seconds_per_step_by_hand():
    """4 ranks in one node, full sharding, 3 micro-batches of 2 x 16 tokens; then 8 ranks as 2 nodes x 4 with HSDP,
    and with full sharding across both nodes."""
    sb, sr, sroot, slast = _counts(STUDENT)
    tb, tr, troot, _ = _counts(TEACHER)
    ps = sb + sr + sroot
    # Per micro-batch: student blocks twice (forward, backward) in bf16 and the last once more, its float32 routers
    # twice, teacher blocks once in bf16 and its routers once in float32, both roots once in bf16; gradients
    # reduce-scattered in float32.
    gather = 2 * (sb * 2 + sr * 4) + slast * 2 + tb * 2 + tr * 4 + (sroot + troot) * 2
    hw = Hardware(gpu_memory="80GiB", gpus_per_node=4, nodes=2, intra_node_bandwidth="100GB/s",
                  inter_node_bandwidth="10GB/s")  # fmt: skip
    kw = {"micro": 2, "grad_accum": 3, "seq_len": 16, "gather_bytes": 2, "teacher_bytes": 2}
    one_node = step_traffic(TEACHER, STUDENT, hw, ranks=4, shards=4, checkpointing=False, **kw)
    assert one_node.gathered == int(3 / 4 * gather * 3)
    assert one_node.reduced == int(3 / 4 * ps * 4 * 3)
    assert one_node.all_reduced == 0 and one_node.replicas == 1
    assert one_node.gather_seconds == pytest.approx(one_node.gathered / 100e9)
    compute = 3 * 2 * 16 * (6 * ps + 2 * (tb + tr + troot)) / H100_FLOPS
    assert one_node.compute_seconds == pytest.approx(compute)
    # These tiny models compute for nanoseconds: the step is its communication.
    assert one_node.step_seconds == pytest.approx((one_node.gathered + one_node.reduced) / 100e9)

    hsdp = step_traffic(TEACHER, STUDENT, hw, ranks=8, shards=4, checkpointing=True, **kw)
    assert (hsdp.gathered, hsdp.reduced) == (one_node.gathered, one_node.reduced)  # the same node-local rings
    # Each rank's float32 gradient shard (ps x 4 / 4 shards), ring all-reduced over 2 copies: 2 x 1/2 of it.
    assert hsdp.all_reduced == ps
    assert hsdp.all_reduce_seconds == pytest.approx(ps / 10e9)
    assert hsdp.compute_seconds == pytest.approx(compute * (8 * ps + 2 * (tb + tr + troot)) / (6 * ps + 2 * (tb + tr + troot)))
    assert hsdp.step_seconds == pytest.approx((hsdp.gathered + hsdp.reduced) / 100e9 + ps / 10e9)

    full = step_traffic(TEACHER, STUDENT, hw, ranks=8, shards=8, checkpointing=False, **kw)
    assert full.gathered == int(7 / 8 * gather * 3) and full.all_reduced == 0
    assert full.bandwidth == 10e9  # its rings cross the network
    assert full.step_seconds == pytest.approx((full.gathered + full.reduced) / 10e9)


# Each rank of 4, as 2 "nodes" x 2 (LOCAL_WORLD_SIZE 2: HSDP's 2-D mesh): teacher and student loaded as
# `distill.loop` loads them (FSDP2 over gloo, float32), then 2 micro-batches of forward + backward with the cross-node
# all-reduce only in the last (as the loop accumulates), every all-gather, reduce-scatter and all-reduce FSDP2 issues
# counted in bytes. Full sharding with and without activation checkpointing, then HSDP.
WORKER = """
import json, os, sys, torch
import torch.distributed as dist
from pathlib import Path
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.distill import loop, parallel
from minipuzzle.settings import DistillSettings

os.environ["LOCAL_WORLD_SIZE"] = "2"
torch.set_num_threads(1)
teacher, student, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
d = parallel.init("cpu")
moved = {"gather": 0, "reduce": 0, "all_reduce": 0}
real = dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce
def ag(output, input, *a, **k):
    moved["gather"] += output.numel() * output.element_size()
    return real[0](output, input, *a, **k)
def rs(output, input, *a, **k):
    moved["reduce"] += input.numel() * input.element_size()
    return real[1](output, input, *a, **k)
def ar(tensor, *a, **k):
    moved["all_reduce"] += tensor.numel() * tensor.element_size()
    return real[2](tensor, *a, **k)
result = {}
for sharding, ckpt in (("full", False), ("full", True), ("per_node", False)):
    cfg = DistillSettings(teacher=teacher, student=student, data="unused", output=str(out / "o"), seq_len=16,
                          max_steps=1, batch_size=8, grad_accum=2, activation_checkpointing=ckpt, sharding=sharding,
                          device="cpu")
    objective = loop._load_models(cfg, Checkpoint(teacher), Checkpoint(student), d)
    dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce = ag, rs, ar
    gen = torch.Generator().manual_seed(d.rank)
    result[f"{sharding} {ckpt}"] = []
    for i in range(2):
        before = dict(moved)
        objective.set_requires_all_reduce(i == 1)
        objective(torch.randint(0, 320, (1, 16), generator=gen))["loss"].backward()
        result[f"{sharding} {ckpt}"].append({k: moved[k] - before[k] for k in moved})
    dist.all_gather_single, dist.reduce_scatter_single, dist.all_reduce = real
(out / f"rank{d.rank}.json").write_text(json.dumps(result))
parallel.shutdown(d)
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("comm")
    return (save_model(random_model(TEACHER, seed=1), root / "teacher"),
            save_model(random_model(STUDENT, seed=2), root / "student"))  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_four_ranks_move_what_the_plan_counts(pair, tmp_path):
    """Measured per micro-batch on 4 gloo ranks as 2 nodes x 2 (float32 gathers on the CPU): the bytes FSDP2
    all-gathers and reduce-scatters equal the plan's counts (as full tensors: the plan's per-rank figure is
    (n - 1) / n of them, a ring's share), with and without activation checkpointing (the recompute gathers nothing
    more); under HSDP each rank also all-reduces its float32 gradient shard across the 2 nodes, in the last
    micro-batch only. With the models of the hand count above: 395,680 float32 values gathered and 125,368
    reduce-scattered per micro-batch, of which the student's last block (12,352, an MLP) was gathered three
    times."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", str(script), str(pair[0]),
           str(pair[1]), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    hw = Hardware(device="cpu", gpu_memory="64GiB", gpus_per_node=2, nodes=2)
    gathered, reduced = 395_680 * 4, 125_368 * 4  # bytes of whole tensors per micro-batch
    for rank in range(4):
        measured = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key, runs in measured.items():
            sharding, ckpt = key.split()
            shards = 4 if sharding == "full" else 2
            planned = step_traffic(TEACHER, STUDENT, hw, ranks=4, shards=shards, micro=1, grad_accum=2,
                                   seq_len=16, checkpointing=ckpt == "True", gather_bytes=4, teacher_bytes=4)  # fmt: skip
            # FSDP2 pads shards to whole rows: these models' rows split evenly over 2 and 4 ranks, so exactly.
            ring = (shards - 1) / shards
            assert [r["gather"] for r in runs] == [gathered] * 2 and planned.gathered == int(ring * gathered * 2)
            assert [r["reduce"] for r in runs] == [reduced] * 2 and planned.reduced == int(ring * reduced * 2)
            # HSDP: the last micro-batch all-reduces the rank's shard (reduced / 2) over 2 copies: a ring all-reduce
            # moves 2 x (2 - 1) / 2 = 1 times it.
            shard = reduced // 2 if sharding == "per_node" else 0
            assert [r["all_reduce"] for r in runs] == [0, shard] and planned.all_reduced == shard, key

WIDE = tiny_moe_layout(n_routed_experts=64, moe_intermediate_size=64)  # its optimizer states outweigh a sequence


def _hand_step(sharding: str, micro: int, nodes: int, intra: float, inter: float) -> float:
    """Seconds of one step of 128 sequences on nodes x 8 ranks, WIDE distilled into itself in bf16 on GPUs, by
    hand: its compute (nanoseconds) is hidden, so a step is its communication. HSDP: grad_accum rings over a
    node's 8 GPUs, then a ring all-reduce of each rank's float32 shard over the node copies; full sharding:
    grad_accum rings over all ranks, at the slower link."""
    b, r, root, last = _counts(WIDE)
    ps = b + r + root
    per_micro = 2 * (b * 2 + r * 4) + last * 2 + b * 2 + r * 4 + 2 * root * 2 + ps * 4
    accum = 128 // (8 * nodes) // micro
    if sharding == "per_node":
        return accum * 7 / 8 * per_micro / intra + 2 * (nodes - 1) / nodes * ps * 4 / 8 / inter
    n = 8 * nodes
    return accum * (n - 1) / n * per_micro / min(intra, inter)


def _choose(memory_mib: float, nodes: int, inter_gb: float):
    """(the plan's part, {sharding: its best micro-batch}) with activation checkpointing off (a user choice, so
    the plan chooses only the sharding and the micro-batch)."""
    # Sized above the CUDA context every GPU process holds (memory.CUDA_CONTEXT_BYTES), so memory_mib is what
    # the training's own terms may use.
    hw = Hardware(gpu_memory=int(memory_mib * 2**20 + CUDA_CONTEXT_BYTES / 0.9), gpus_per_node=8, nodes=nodes, intra_node_bandwidth="100GB/s",
                  inter_node_bandwidth=f"{inter_gb}GB/s")  # fmt: skip
    kw = {"seq_len": 4, "global_batch": 128, "loss_chunk": 4}
    part = train_memory("distill", "distill", WIDE, WIDE, hw, fixed=Fixed(checkpointing=False), **kw)
    micros = {s: train_memory("distill", "distill", WIDE, WIDE, hw, fixed=Fixed(sharding=s, checkpointing=False),
                              **kw).geometry.micro_batch for s in ("per_node", "full")}  # fmt: skip
    return part, micros


def test_the_sharding_flips_with_the_network_as_the_arithmetic_says():
    """2 nodes x 8 with memory for one sequence per micro-batch under HSDP (8 micro-batches: 8 rounds of node-local
    gathers) and four under full sharding (2 rounds, but over the network): HSDP while the network is slow, full
    sharding once 2 rounds over it take less than 8 over NVLink (100 GB/s) plus HSDP's all-reduce."""
    chosen = {}
    for inter in (10, 20, 30, 50):
        part, micros = _choose(11.5, 2, inter)
        assert micros == {"per_node": 1, "full": 4}
        hand = {s: _hand_step(s, m, 2, 100e9, inter * 1e9) for s, m in micros.items()}
        faster = min(hand, key=hand.get)
        assert max(hand.values()) > 1.05 * min(hand.values())  # no near-tie on this grid
        assert part.geometry.sharding == faster and part.geometry.micro_batch == micros[faster]
        assert part.traffic.step_seconds == pytest.approx(hand[faster], rel=0.01)  # compute adds < 1 %
        chosen[inter] = faster
    assert chosen == {10: "per_node", 20: "per_node", 30: "full", 50: "full"}


def test_the_sharding_flips_with_the_node_count_as_the_arithmetic_says():
    """128 sequences per step at 60 GB/s between nodes: on 2 nodes each rank trains 8, HSDP fits 4 per micro-batch
    (2 rounds over NVLink) and full sharding all 8 (1 round over the network, faster); on 4 nodes each rank trains
    4, which HSDP fits in one micro-batch too: one round over NVLink beats one over the network."""
    for nodes, want, fit in ((2, "full", {"per_node": 4, "full": 8}), (4, "per_node", {"per_node": 4, "full": 4})):
        part, micros = _choose(13, nodes, 60)
        hand = {s: _hand_step(s, m, nodes, 100e9, 60e9) for s, m in micros.items()}
        assert micros == fit and min(hand, key=hand.get) == want == part.geometry.sharding, (nodes, micros, hand)


def test_the_56b_dry_run_prices_communication_and_recompute_by_hand():
    """The shipped 56B -> 47B recipe on 8 x 8 H100 (defaults: 360 GB/s in a node, 40 GB/s between nodes): HSDP
    cannot hold 16 bytes per parameter of the (not yet pruned, so 56B-bounded) student on 8 GPUs, so full
    sharding over 64 ranks, micro 1 x 12, checkpointing; every gather and reduce-scatter crosses the network."""
    p = 56_324_350_464  # Nemotron-H-56B's parameters (transformers' count: 56.324e9)
    h, v, ffn = 8192, 131072, 32768
    root = 2 * v * h + h  # embeddings, LM head, final norm
    blocks, last = p - root, 2 * h * ffn + h  # it ends with an MLP block
    ring, accum = 63 / 64, 12
    gathered = ring * accum * ((3 * blocks + 2 * root) * 2 + last * 2)  # student twice + teacher once, bf16
    reduced = ring * accum * p * 4
    comm = (gathered + reduced) / 40e9
    compute = accum * 8192 * (8 * p + 2 * p) / 400e12  # 6N + 2N recompute for the student, 2N for the teacher
    assert comm == pytest.approx(165.38, abs=0.01) and compute == pytest.approx(138.42, abs=0.01)
    from minipuzzle.search.stage import H100_FLOPS as priced  # the figure every GPU-hour estimate uses

    assert priced == H100_FLOPS == 400e12

    code, out, err = run_cli(["run", "nemotron-h-56b-to-47b", "--dry-run", "--json"])
    assert code == 0, err
    plan = json.loads(out)
    part = next(s for s in plan["memory"]["stages"] if s["stage"] == "distill")["parts"][0]
    g, t = part["geometry"], part["traffic"]
    assert (g["sharding"], g["devices"], g["micro_batch"], g["grad_accum"], g["activation_checkpointing"]) == (
        "full", 64, 1, 12, True)  # fmt: skip
    assert t["gathered"] == pytest.approx(gathered, rel=1e-9) and t["reduced"] == pytest.approx(reduced, rel=1e-9)
    assert t["step_seconds"] == pytest.approx(comm) and t["compute_seconds"] == pytest.approx(compute)
    assert t["why"].startswith("full sharding: HSDP does not fit (needs ")
    steps, tokens = 10014, 10014 * 768 * 8192  # 63e9 tokens in steps of 768 x 8192
    before = tokens * (6 * p + 2 * p) / 400e12 / 3600  # the estimate before: no recompute, no communication
    after = tokens * (8 * p + 2 * p) / 400e12 / 3600 + steps * 64 * (comm - compute) / 3600
    distill = next(s for s in plan["stages"] if s["stage"] == "distill")
    assert before == pytest.approx(19714.35, abs=0.01)
    assert distill["gpu_hours"] == pytest.approx(after, rel=1e-9) == pytest.approx(29442.3, abs=0.1)
    assert "InfiniBand" in plan["links"] and "assumed" in plan["links"]

    code, text, _ = run_cli(["run", "nemotron-h-56b-to-47b", "--dry-run"])
    flat = " ".join(text.split())
    assert "distill: gathers 3.95 TB, reduce-scatters 2.66 TB per rank per step; 165.4 s over the network" in flat
    assert "communication not hidden adds 4799.4 GPU-hours" in flat and "links: inside a node 360 GB/s" in flat


def test_unsharded_accumulation_when_the_whole_gradient_fits_and_saves_time():
    """1 node x 8, WIDE into itself, 4 micro-batches of 4 sequences per rank (both given, and checkpointing off):
    accumulating unsharded holds the whole float32 gradient (4 bytes per parameter) on every GPU and saves 3
    of the step's 4 reduce-scatters. With memory for it the plan takes it, and its step is the hand count's; with
    less, it keeps sharded accumulation; given explicitly where it does not fit, it is refused naming the option."""
    b, r, root, last = _counts(WIDE)
    ps = b + r + root
    gather = 2 * (b * 2 + r * 4) + last * 2 + b * 2 + r * 4 + 2 * root * 2  # bf16 blocks, float32 routers
    kw = {"seq_len": 4, "global_batch": 128, "loss_chunk": 4}

    def plan(memory: int, accumulation=None):
        hw = Hardware(gpu_memory=memory, gpus_per_node=8, nodes=1, intra_node_bandwidth="100GB/s")
        fixed = Fixed(grad_accum=4, checkpointing=False, accumulation=accumulation)
        return train_memory("distill", "distill", WIDE, WIDE, hw, fixed=fixed, **kw)

    roomy = plan(80 * 2**30)
    sharded, unsharded = plan(80 * 2**30, "sharded"), plan(80 * 2**30, "unsharded")
    # The whole float32 gradient in place of one rank's shard of it.
    assert unsharded.memory.gradients - sharded.memory.gradients == 4 * ps - 4 * ps // 8
    assert roomy.geometry.accumulation == "unsharded" and roomy.geometry.micro_batch == 4
    assert roomy.traffic.reduced == int(7 / 8 * ps * 4)  # one reduce-scatter per step
    assert sharded.traffic.reduced == int(7 / 8 * ps * 4 * 4)
    hand = 7 / 8 * (4 * gather + ps * 4) / 100e9  # compute (nanoseconds) hides nothing
    assert roomy.traffic.step_seconds == pytest.approx(hand, rel=0.01)
    assert sharded.traffic.step_seconds == pytest.approx(7 / 8 * 4 * (gather + ps * 4) / 100e9, rel=0.01)

    # Memory for the sharded launch and half the whole gradient more: sharded.
    tight = int((sharded.device_total + 2 * ps) / 0.9)
    assert plan(tight).geometry.accumulation == "sharded"
    refused = plan(tight, "unsharded")
    assert not refused.fits and refused.problem.endswith("with --grad-accum 4, --activation-checkpointing False, "
                                                         "--accumulation unsharded as given")  # fmt: skip
