"""Memory plans: the hardware as an input, every stage's resident bytes against hand counts for the 56B -> 47B run on
8 nodes x 8 H100-80GB, and refusal of a run
that cannot fit (one line, exit 2, nothing written)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, detect, host_ram, resolve
from minipuzzle.memory import (
    EvalShape,
    Fixed,
    data_parallel_ranks,
    distill_memory,
    eval_memory,
    ranking_memory,
    score_memory,
    train_memory,
)
from minipuzzle.presets import PRESETS
from minipuzzle.recipe import RECIPES_DIR, parse_recipe, plan_run
from minipuzzle.testing import run_cli

# The published models' parameter counts (transformers' own), widths, and the 56B run's sequence and batch.
P56, P47 = 56.324e9, 46.792e9
H, V, T = 8192, 131072, 8192
FFN56, FFN47 = 32768, 30720
LAYERS56, LAYERS47 = 118, 98
GIB = 2**30
USABLE = 0.9 * 80 * GIB  # a part may use 90 % of a device (memory.USABLE)
CLUSTER = Hardware(gpu_memory="80GiB", gpus_per_node=8, nodes=8, mamba_kernels=True)  # the gpu extra installed
# Largest layers (FSDP2 units, streamed layers): an MLP block, 2 x h x ffn plus its norm.
MLP56, MLP47 = 2 * H * FFN56 + H, 2 * H * FFN47 + H
# Embeddings + LM head + final norm of one model.
RESIDENT = 2 * V * H + H
# Forward bytes per token of the 56B's widest block without autograd (bf16, fused kernels): a Mamba layer. Block
# input and output and RMSNorm (2 x 2h + 10h); in_proj's output (2I + 2GN + heads = 37120), the conv output
# (I + 2GN = 20480) and the scan output (I = 16384) in bf16; the float32 chunk states (256 heads x 64 x 256 state
# / 128-token chunks x 4 bytes); three float32 [T, I] temporaries of the gated norm.
MAMBA56_FORWARD = 14 * H + 2 * (37120 + 20480 + 16384) + 4 * 256 * 64 * 256 // 128 + 12 * 16384


def test_hardware_reads_sizes_and_names_the_recipe_key():
    hw = Hardware(gpu_memory="80GiB", gpus_per_node=8, nodes=8, host_memory="2TiB")
    assert (hw.gpu_memory, hw.devices, hw.host_memory) == (80 * GIB, 64, 2 * 2**40)
    assert hw.describe() == (
        "8 nodes x 8 GPUs of 80 GiB, PyTorch Mamba path (kernels not known for this hardware: set hardware.mamba_kernels)"
    )
    assert hw.model_copy(update={"mamba_kernels": True}).describe() == (
        "8 nodes x 8 GPUs of 80 GiB, fused Mamba kernels (as the hardware says)"
    )
    doc = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
    doc["hardware"] = {"gpu_memory": "lots"}
    with pytest.raises(UserError, match=r"hardware\.gpu_memory: cannot read gpu_memory 'lots'"):
        parse_recipe(doc)
    doc["hardware"] = {"gpu_memory": "80GiB", "gpus": 8}
    with pytest.raises(UserError, match=r"hardware\.gpus: unknown key"):
        parse_recipe(doc)


def test_detect_is_this_machine_and_options_override_it():
    hw = detect()
    meminfo = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:"))
    assert hw.host_memory == host_ram() <= int(meminfo.split()[1]) * 1024
    if torch.cuda.is_available():
        assert (hw.device, hw.gpus_per_node) == ("cuda", torch.cuda.device_count())
    else:  # the CPU is the one device, with the host's RAM
        assert (hw.device, hw.gpu_memory, hw.devices) == ("cpu", hw.host_memory, 1)
        planned = resolve(None, {"gpu_memory": "80GiB", "gpus": 8})  # a dry run here for a GPU machine
        assert (planned.device, planned.gpu_memory, planned.gpus_per_node, planned.host_memory) == (
            "cuda", 80 * GIB, 8, None)  # fmt: skip
    section = Hardware(gpu_memory="40GiB", gpus_per_node=4, nodes=2)
    assert resolve(section, {"gpus": 8}) == Hardware(gpu_memory="40GiB", gpus_per_node=8, nodes=2)
    assert resolve(section, {}) == section
    # --host-memory: the node's RAM; alone on a CPU-only machine also its one device's memory.
    assert resolve(section, {"host_memory": "1TiB"}).host_memory == 1024 * GIB
    cpu = Hardware(device="cpu", gpu_memory="24GiB", host_memory="24GiB")
    assert resolve(cpu, {"host_memory": "2GiB"}) == Hardware(device="cpu", gpu_memory="2GiB", host_memory="2GiB")
    assert resolve(cpu, {"gpu_memory": "80GiB", "host_memory": "1TiB"}) == Hardware(gpu_memory="80GiB",
                                                                                      host_memory="1TiB")  # fmt: skip


def test_ranks_divide_the_batch_in_whole_nodes():
    assert data_parallel_ranks(CLUSTER, 768) == 64
    assert data_parallel_ranks(Hardware(gpu_memory="80GiB", gpus_per_node=8), 4) == 4
    assert data_parallel_ranks(Hardware(gpu_memory="80GiB", gpus_per_node=8, nodes=10), 768) == 64
    assert data_parallel_ranks(Hardware(device="cpu", gpu_memory="64GiB"), 768) == 1


def test_distill_56b_to_47b_on_8x8_h100():
    """768 x 8192 tokens per step on 64 GPUs: FSDP2 across all nodes (one node cannot hold the 47B's float32
    weights, moments and gradients: 16 bytes x 46.8e9 = 749 GB > 8 x 80 GiB), checkpointing, micro-batch 1 x 12."""
    part = train_memory("distill", "distill", PRESETS["56b"].layout, PRESETS["47b"].layout, CLUSTER, seq_len=T,
                        global_batch=768, loss_chunk=4096)  # fmt: skip
    g, m = part.geometry, part.memory
    assert (g.devices, g.nodes, g.sharding, g.dtype) == (64, 8, "full", "bfloat16")
    assert (g.micro_batch, g.grad_accum, g.activation_checkpointing) == (1, 12, True)
    approx = lambda x: pytest.approx(x, rel=2e-4)  # noqa: E731 (the published counts have 5 digits)
    assert m.master_weights == approx(P47 * 4 / 64)
    assert m.optimizer_state == approx(P47 * 8 / 64)
    # Float32 gradient shard, one MLP block's bf16 gradients and its float32 reduce-scatter buffer, and the chunked
    # loss's bf16 [V, h] head-gradient accumulator.
    assert m.gradients == approx(P47 * 4 / 64 + MLP47 * (2 + 4) + V * H * 2)
    # The teacher's bf16 shard, both models' embeddings and heads gathered in bf16, two blocks of each gathered.
    assert m.weights == approx(P56 * 2 / 64 + 2 * RESIDENT * 2 + 2 * (MLP47 + MLP56) * 2)
    # bf16 residual stream: 98 checkpointed block inputs, one MLP block recomputed (RMSNorm 10h + relu and its
    # square 2 x 2 x ffn) with its gradients, both final hidden states and the student's gradient, the teacher's
    # forward.
    recompute = 2 * (10 * H + 4 * FFN47)
    assert m.activations == T * (LAYERS47 * H * 2 + recompute + 3 * H * 2 + MAMBA56_FORWARD)
    assert m.logits == 7 * 4096 * V * 4  # 2 GiB per float32 [4096, V] buffer, 7 alive at once
    # Each GPU process's CUDA context (0.5 GiB); its node's RAM holds 8 ranks' interpreters (0.49 GB each) and
    # torchrun's launcher (0.23 GB), which a script starts on each of the 8 nodes.
    assert m.baseline == 2**29 and m.host_baseline == 8 * 490e6 + 230e6
    total = 2**29 + m.weights + m.master_weights + m.optimizer_state + m.gradients + m.activations + m.logits
    assert part.device_total == total <= USABLE
    per_sequence = T * (LAYERS47 * H * 2 + recompute + 3 * H * 2 + MAMBA56_FORWARD)
    assert total + per_sequence > USABLE  # micro-batch 2 would not fit
    assert m.activations_full > USABLE  # nor would any micro-batch without checkpointing
    # Told --grad-accum 1, each of the 64 ranks trains 768 / 64 = 12 sequences per micro-step: 98 bf16 block
    # inputs of 12 x 8192 tokens alone are ~158 GB (float32 gathers would double that to ~315 GB).
    told = train_memory("distill", "distill", PRESETS["56b"].layout, PRESETS["47b"].layout, CLUSTER, seq_len=T,
                        global_batch=768, fixed=Fixed(grad_accum=1, checkpointing=True))  # fmt: skip
    assert not told.fits and told.geometry.micro_batch == 12 and told.geometry.grad_accum == 1
    assert told.memory.activations > LAYERS47 * H * 2 * 12 * T == pytest.approx(157.9e9, rel=1e-3)


def test_a_given_grad_accum_picks_ranks_that_split_the_batch_or_is_refused():
    """Every rank runs the same micro-batches, so ranks x grad-accum must divide the batch. Told --grad-accum 24,
    the plan takes 768 / 24 = 32 ranks (4 whole nodes), one sequence each per micro-step; with 64 processes fixed
    (a launch or a recipe's nnodes x nproc_per_node) 64 x 24 = 1536 does not divide 768: refused, not planned
    with a micro-batch of 0 sequences (it used to divide by zero)."""
    kw = dict(seq_len=T, global_batch=768)
    a, b = PRESETS["56b"].layout, PRESETS["47b"].layout
    free = train_memory("distill", "distill", a, b, CLUSTER, **kw, fixed=Fixed(grad_accum=24, checkpointing=True))
    g = free.geometry
    assert (g.devices, g.nodes, g.micro_batch, g.grad_accum) == (32, 4, 1, 24)
    for fixed, split in ((Fixed(ranks=64, grad_accum=24), "64 processes x --grad-accum 24"),
                         (Fixed(ranks=40), "40 processes")):  # fmt: skip
        part = train_memory("distill", "distill", a, b, CLUSTER, **kw, fixed=fixed)
        assert not part.fits and part.problem == f"its batch of 768 sequences does not split evenly over {split}"


def test_score_56b_streams_on_one_h100():
    """Depth scoring keeps L + 1 = 119 residual states [8192, 8192] in bf16 per window (16 GB): the 56B (113 GB in
    bf16) streams, one layer at a time."""
    depth, width = score_memory(PRESETS["56b"].layout, CLUSTER, seq_len=T, depth_samples=128, width_samples=1024,
                                dtype="bfloat16")  # fmt: skip
    assert depth.fits and width.fits and depth.geometry.streaming and width.geometry.streaming
    rows, micro = depth.geometry.rows_per_chunk, depth.geometry.micro_batch
    assert depth.memory.weights == (RESIDENT + MLP56) * 2
    per_row = (LAYERS56 + 1) * T * H * 2
    assert per_row == pytest.approx(15.97e9, rel=1e-3)
    assert depth.memory.activations == rows * per_row + micro * T * MAMBA56_FORWARD
    assert depth.device_total <= USABLE < depth.device_total + per_row  # as many rows as fit
    # Host: the embeddings read at open (larger than a layer) in bf16, and the windows' token ids.
    assert depth.memory.host_buffers == V * H * 2 + 1024 * T * 8


def test_ranking_56b_streams_in_bf16_with_chunked_logits():
    part = ranking_memory(PRESETS["56b"].layout, CLUSTER, seq_len=T, held_out_windows=128, batch_size=8, dtype="bfloat16")
    m, g = part.memory, part.geometry
    assert part.fits and g.streaming and g.logits_chunk == 4096
    assert m.weights == (2 * RESIDENT + MLP56) * 2  # the parent's and the candidate's embeddings and heads
    assert m.logits == 4096 * V * (6 * 4 + 2)  # six float32 [4096, V] buffers and the head's bf16 output
    # The parent's final states are kept on the host for groups of 8 GiB / (8192 x 8192 x 2 bytes) = 64 windows.
    assert m.host_buffers == 64 * T * H * 2 + V * H * 2 + 128 * T * 8
    # The whole bf16 parent and a cut candidate (2 x 112.6 GB) cannot be in memory: streaming is the plan's choice.
    forced = ranking_memory(PRESETS["56b"].layout, CLUSTER, seq_len=T, held_out_windows=128, dtype="bfloat16", stream=False)
    assert not forced.fits and forced.memory.weights == pytest.approx(2 * P56 * 2, rel=2e-4)
    small = ranking_memory(PRESETS["8b"].layout, CLUSTER, seq_len=1024, held_out_windows=16, batch_size=3, dtype="bfloat16")
    assert small.fits and not small.geometry.streaming and small.geometry.micro_batch == 3


def test_eval_47b_against_56b_spreads_over_four_gpus():
    ev = EvalShape(seq_len=T, held_out_windows=128, batch_size=8, tasks=True)
    sp = eval_memory(PRESETS["47b"].layout, PRESETS["56b"].layout, CLUSTER, ev, dtype="bfloat16")
    held = sp.parts[0]
    assert sp.fits and [p.name for p in sp.parts] == ["held-out", "tasks", "speed"]
    # 206 GB of bf16 weights: three GPUs cannot hold a third each plus the logits; four can. A device map places
    # whole blocks, so each GPU may hold one block of each model more than its share (an MLP block is the largest).
    assert held.geometry.devices == 4 and held.geometry.sharding == "device_map" and not held.geometry.sequential
    assert held.memory.weights == pytest.approx((P47 + P56) * 2 / 4 + (MLP56 + MLP47) * 2, rel=2e-4)
    assert (P47 + P56) * 2 / 3 + held.memory.logits > USABLE
    assert held.memory.logits == 4096 * V * (6 * 4 + 2)
    # On one node of three GPUs both cannot be resident: one model at a time, the teacher's final states of the
    # 128 windows kept on the host (bf16) and its LM head next to the student for the KL.
    three = Hardware(gpu_memory="80GiB", gpus_per_node=3, mamba_kernels=True)
    seq = eval_memory(PRESETS["47b"].layout, PRESETS["56b"].layout, three, ev, dtype="bfloat16").parts[0]
    k = seq.geometry.devices
    assert seq.fits and seq.geometry.sequential and k in (2, 3)
    assert seq.memory.weights == pytest.approx(P56 * 2 / k + MLP56 * 2 + V * H * 2, rel=2e-4)
    assert seq.memory.host_buffers >= 128 * T * H * 2


# The scale rehearsal's layout (benchmarks/scale_rehearsal.py, "full"): wide MLPs, a 4096-token vocabulary.
REHEARSAL = dict(pattern="M-*-M-" * 2, vocab_size=4096, hidden_size=2048, intermediate_size=18432,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=128, mamba_num_heads=32, mamba_head_dim=64,
                 n_groups=4, ssm_state_size=64)  # fmt: skip


def test_eval_offloads_exactly_when_no_whole_model_fits():
    """Offloading (every block read from disk each forward) is the last option: at the least memory any plan
    holding a whole model fits, eval holds one; one byte less, it offloads. Its weights are the largest unit read
    at once (a block, or the embeddings / LM head [V, h]) plus the teacher's head kept for the KL."""
    from minipuzzle.memory import OFFLOAD_SPEED, check
    from minipuzzle.testing import tiny_layout

    lay = tiny_layout(**REHEARSAL)
    ev = EvalShape(seq_len=64, held_out_windows=2, batch_size=8, speed=False)

    def plan(mem: int):
        return eval_memory(lay, lay, Hardware(device="cpu", gpu_memory=mem), ev, stored_bytes=4)

    lo, hi = 1, 2**40  # the least memory whose plan is not offloaded
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if plan(mid).parts[0].geometry.streaming else (lo, mid)
    whole, offloaded = plan(lo).parts[0], plan(lo - 1).parts[0]
    assert whole.fits and not whole.geometry.streaming and whole.geometry.sequential
    assert offloaded.fits and offloaded.geometry.streaming and offloaded.geometry.sequential
    assert offloaded.geometry.devices == 1 and "every forward" in offloaded.note
    mlp = 2 * 2048 * 18432 + 2048  # the largest block, above the embeddings' 4096 x 2048
    assert offloaded.memory.weights == (mlp + 4096 * 2048) * 4
    # 56B against 47B on one 80 GiB GPU: the LM head [V, H] is the largest unit, and the teacher's copy of it.
    gpu = Hardware(gpu_memory="80GiB", gpus_per_node=1)
    big = eval_memory(PRESETS["47b"].layout, PRESETS["56b"].layout, gpu, ev.model_copy(update={"seq_len": T}),
                      dtype="bfloat16")  # fmt: skip
    assert big.fits and big.parts[0].geometry.streaming and big.parts[0].memory.weights == 2 * V * H * 2
    # Timing a model read from disk times the disk: with speed on, the speed part is refused in one line.
    with_speed = eval_memory(lay, lay, Hardware(device="cpu", gpu_memory=lo - 1), ev.model_copy(update={"speed": True}),
                             stored_bytes=4)  # fmt: skip
    speed = with_speed.parts[-1]
    assert speed.name == "speed" and not speed.fits and speed.problem == OFFLOAD_SPEED
    with pytest.raises(UserError, match=r"^eval \(speed\) does not fit: .*--no-speed.*eval\.speed: false"):
        check(Hardware(device="cpu", gpu_memory=lo - 1), with_speed)


def test_cpu_plans_count_host_buffers_against_the_one_memory():
    hw = Hardware(device="cpu", gpu_memory="64GiB", host_memory="64GiB")
    for p in score_memory(PRESETS["8b"].layout, hw, seq_len=512, depth_samples=8, width_samples=8):
        assert p.geometry.dtype == "float32"
        assert p.device_total == p.memory.device_total + p.memory.host_buffers


def test_shipped_56b_recipe_fits_8x8_h100():
    plan = plan_run(_recipe_56b())
    assert plan["memory"]["hardware"] == {"device": "cuda", "gpu_memory": 80 * GIB, "gpus_per_node": 8, "nodes": 8,
                                          "host_memory": None, "mamba_kernels": True, "intra_node_bandwidth": None,
                                          "inter_node_bandwidth": None}  # fmt: skip
    stages = {s["stage"]: s for s in plan["memory"]["stages"]}
    assert set(stages) == {"score", "prune", "distill", "quantize", "eval"}
    assert all(s["fits"] for s in stages.values())
    assert [p["name"] for p in stages["prune"]["parts"]] == ["ranking", "candidate distillation", "cut"]
    # Distillation and candidate distillation as 64 ranks, FSDP2 in bf16, micro 1 x 12, checkpointing.
    distill, candidates = stages["distill"]["parts"][0], stages["prune"]["parts"][1]
    for part in (distill, candidates):
        g = part["geometry"]
        assert (g["devices"], g["sharding"], g["micro_batch"], g["grad_accum"]) == (64, "full", 1, 12)
    assert plan["refusal"] is None


def _recipe_56b():
    return parse_recipe(yaml.safe_load((RECIPES_DIR / "nemotron-h-56b-to-47b.yaml").read_text()))


def test_one_24gib_gpu_is_refused_in_one_line_before_anything_is_written(tmp_path):
    doc = yaml.safe_load((RECIPES_DIR / "nemotron-h-56b-to-47b.yaml").read_text())
    doc["hardware"] = {"gpu_memory": "24GiB", "gpus_per_node": 1, "nodes": 1}
    recipe = tmp_path / "small.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    code, _, err = run_cli(["run", str(recipe), "-o", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: score (depth pass) does not fit: needs ") and "1 GPU of 24 GiB" in err
    assert not out.exists()
    # The dry run shows the same plan; --gpu-memory / --gpus override the recipe's section.
    code, out_json, _ = run_cli(["run", str(recipe), "--dry-run", "--json"])
    plan = json.loads(out_json)
    assert code == 0 and plan["refusal"].startswith("score (depth pass) does not fit")
    assert not plan["memory"]["stages"][0]["fits"]
    code, out_json, _ = run_cli(["run", str(recipe), "--dry-run", "--json", "--gpu-memory", "80GiB", "--gpus", "8",
                                 "--mamba-kernels"])  # fmt: skip
    assert json.loads(out_json)["memory"]["hardware_text"] == "8 GPUs of 80 GiB, fused Mamba kernels (as the hardware says)"
    code, text, _ = run_cli(["run", str(recipe), "--dry-run"])
    assert code == 0 and "does not fit" in text and "a run would be refused" in text


def test_prune_on_the_cpu_of_a_gpu_machine_is_checked_against_its_ram():
    """`prune --device cpu` on a GPU machine ranks on the host, in float32: the parent and a cut candidate in
    memory (2 x 8.101e9 x 4 bytes for the 8B) do not fit its 32 GiB of RAM, so the plan streams."""
    from minipuzzle.memory import prune_stage
    from minipuzzle.settings import PruneSettings

    hw = Hardware(gpu_memory="80GiB", gpus_per_node=8, host_memory="32GiB")
    ps = PruneSettings(target="4b", device="cpu", seq_len=4096, held_out_windows=16)
    ranking, cut = prune_stage(PRESETS["8b"].layout, hw, ps).parts
    assert ranking.fits and cut.fits and ranking.geometry.streaming and ranking.geometry.dtype == "float32"
    assert ranking.device_total <= 0.9 * 32 * GIB
    forced = prune_stage(PRESETS["8b"].layout, hw, ps.model_copy(update={"stream": False})).parts[0]
    assert forced.memory.weights == pytest.approx(2 * 8.101e9 * 4, rel=2e-4)
    assert "the CPU with 32 GiB of RAM" in forced.problem
    on_gpu = prune_stage(PRESETS["8b"].layout, hw, ps.model_copy(update={"device": "auto"})).parts[0]
    assert on_gpu.geometry.dtype == "bfloat16" and not on_gpu.geometry.streaming


@pytest.fixture
def tiny_model_dir(tiny_checkpoint):
    if tiny_checkpoint.name != "model":
        pytest.skip("one weight style is enough for the commands")
    return str(tiny_checkpoint)


@pytest.mark.parametrize("command", ["score", "prune", "distill", "eval"])
def test_stage_commands_refuse_what_cannot_fit(command, tmp_path, tiny_model_dir, text_file):
    """Each stage command takes --gpu-memory / --gpus and refuses a plan that cannot fit in one line, exit 2,
    before anything is written (the same commands run on this machine's memory in their own tests)."""
    out = tmp_path / "out"
    args = {
        "score": ["score", tiny_model_dir, "--data", str(text_file), "--samples", "2", "--seq-len", "32"],
        "prune": ["prune", tiny_model_dir, "--target", "0.8", "--data", str(text_file), "--seq-len", "32"],
        "distill": [
            "distill",
            "--teacher",
            tiny_model_dir,
            "--student",
            tiny_model_dir,
            "--data",
            str(text_file),
            "--max-steps",
            "1",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
        ],  # fmt: skip
        "eval": ["eval", tiny_model_dir, "--data", str(text_file), "--seq-len", "32", "--held-out-windows", "2"],
    }[command]
    code, _, err = run_cli([*args, "-o", str(out), "--gpu-memory", "64KiB", "--gpus", "1"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {command}") and "does not fit" in err and "1 GPU of 64 KiB" in err
    assert not out.exists()


def test_a_cut_that_only_drops_layers_is_planned_without_tensor_copies():
    """A plan that only drops layers writes the source's tensors as stored (views of the file mapping, paged in
    when their shard is written: the rehearsal measures it), so its cut holds one output shard; a plan that narrows
    any width, or picks channels per expert, copies each tensor it cuts, so the tensor read and its copy (the
    largest tensor twice, counted here by hand: the 8B preset's bf16 embeddings [V, h]) come on top."""
    from minipuzzle.cut import Plan
    from minipuzzle.memory import cut_memory
    from minipuzzle.testing import tiny_moe_layout

    layout = PRESETS["8b"].layout
    keep = [i for i in range(layout.num_layers) if i != 3]
    assert not Plan(keep).copies_tensors(layout)
    assert Plan(keep, ffn={i: list(range(100)) for i in keep if layout.pattern[i] == "-"}).copies_tensors(layout)
    assert Plan(keep, hidden=list(range(layout.hidden_size - 64))).copies_tensors(layout)
    moe = tiny_moe_layout()
    e = [i for i, k in enumerate(moe.pattern) if k == "E"]
    per_expert = {i: [list(range(moe.moe_intermediate_size))] * moe.n_routed_experts for i in e}
    assert Plan(list(range(moe.num_layers)), expert_channels=per_expert).copies_tensors(moe)

    hw = Hardware(device="cpu", gpu_memory="64GiB", host_memory="64GiB")
    views, copies = cut_memory(layout, hw, copies=False), cut_memory(layout, hw)
    largest = 131072 * 4096 * 2  # the embeddings: Nemotron-H 8B's vocabulary x hidden, bf16
    assert views.memory.host_buffers == views.geometry.shard_bytes
    assert copies.memory.host_buffers - views.memory.host_buffers == 2 * largest


def test_a_sharded_qad_plans_its_export_whole_on_rank_0():
    """QAD on 8 x 8 H100-80GB for the 47B preset student: the FP8 export gathers the float32 student (4 bytes a
    parameter) and the exported state dict (at most 2) on the main node's host, counted by hand here; the NVFP4
    export packs on one GPU, which cannot hold 4 bytes per parameter of a 47B model beside its states: refused in
    one line naming the export."""
    from minipuzzle.settings import DistillSettings

    teacher, student = PRESETS["56b"].layout, PRESETS["47b"].layout
    hw = Hardware(gpu_memory="80GiB", gpus_per_node=8, nodes=8, host_memory="2TiB", mamba_kernels=True)
    base = dict(teacher="t", student="s", data="d", output="o", max_steps=1, batch_size=768, seq_len=8192)
    plain = distill_memory(teacher, student, hw, DistillSettings(**base))
    fp8 = distill_memory(teacher, student, hw, DistillSettings(**base, quantize="fp8"))
    nvfp4 = distill_memory(teacher, student, hw, DistillSettings(**base, quantize="nvfp4"))
    ps = student.num_params()
    assert plain.fits and fp8.fits and plain.memory.host_buffers < 4 * ps
    assert fp8.memory.host_buffers == 6 * ps
    assert not nvfp4.fits and "NVFP4 export gathers the whole float32 student on one GPU" in nvfp4.problem
    assert "\n" not in nvfp4.problem
