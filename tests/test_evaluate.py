"""Evaluation reports on tiny random Nemotron-H models: perplexity/KL/agreement exactness, lm-eval tasks on local
task YAML offline, speed figures, the report folder, and the `eval` CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import load_model
from minipuzzle.data import token_windows
from minipuzzle.distill.toy import drop_layers
from minipuzzle.errors import UserError
from minipuzzle.evaluate.harness import parse_tasks, run_tasks
from minipuzzle.evaluate.runner import evaluate, held_out_stats
from minipuzzle.metrics import token_stats
from minipuzzle.settings import EvalSettings
from minipuzzle.testing import random_model, run_cli, save_model

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK_YAML = TASKS / "tiny_code_mc.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """lm-eval and datasets may not touch the network; datasets' cache goes to a private folder."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("ds_cache")))
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("ds_cache2")), raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Teacher and a depth-pruned student (layers 2 and 5 dropped, then distilled for 4 real steps, so its folder
    holds the distillation's metrics.jsonl) on disk."""
    from minipuzzle.distill.loop import distill
    from minipuzzle.settings import DistillSettings
    from minipuzzle.testing import stdlib_text_files

    root = tmp_path_factory.mktemp("models")
    teacher = random_model(seed=3)
    keep = [i for i in range(teacher.config.num_hidden_layers) if i not in (2, 5)]
    tpath = save_model(teacher, root / "teacher", tokenizer=tokenizer)
    cut = save_model(drop_layers(teacher, keep), root / "cut", tokenizer=tokenizer)
    data = root / "data.txt"
    data.write_text(stdlib_text_files(1)[0].read_text())
    spath = distill(DistillSettings(teacher=str(tpath), student=str(cut), data=str(data), output=str(root / "student"),
                                  max_steps=4, seq_len=16, batch_size=2, lr=3e-3, warmup=1, save_every=0, held_out_windows=0,
                                  progress=False))  # fmt: skip
    return {"teacher": tpath, "student": spath, "keep": keep, "pattern": Layout.from_config(teacher.config).pattern}


def test_perplexity_is_exp_of_mean_token_loss(models, tokenizer, text_file):
    model = load_model(models["student"])
    windows = token_windows(text_file, tokenizer, 40, 7, seed=1)
    stats = held_out_stats(model, windows, batch_size=3)  # 7 windows in uneven batches of 3
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits[:, :-1].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1), reduction="none")
    assert stats["tokens"] == windows[:, 1:].numel()
    assert stats["loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert stats["perplexity"] == pytest.approx(math.exp(losses.mean().item()), rel=1e-5)
    assert stats["perplexity"] == pytest.approx(token_stats(model, windows, batch_size=8)["perplexity"], rel=1e-6)


def test_statistics_from_states_in_chunks_equal_full_logits_and_never_build_them(models, tokenizer, text_file):
    from minipuzzle.metrics import TokenStats, final_states

    teacher, student = load_model(models["teacher"]), load_model(models["student"])
    ids = token_windows(text_file, tokenizer, 32, 3, seed=1)
    full = TokenStats()
    full.add(student(ids, use_cache=False).logits, ids, teacher(ids, use_cache=False).logits)
    calls = []

    def head(model):
        def run(h):
            calls.append(h.shape[0])
            return model.lm_head(h)

        return run

    chunked = TokenStats()
    chunked.add_states(final_states(student, ids), head(student), ids, final_states(teacher, ids), head(teacher),
                       chunk=7)  # fmt: skip
    assert chunked.result() == pytest.approx(full.result(), rel=1e-6)
    assert full.result()["kl_to_teacher"] > 1e-4
    assert max(calls) == 7 and sum(calls) == 2 * ids[:, 1:].numel()  # 93 positions, 7 at a time, both models


def test_kl_to_itself_is_zero_and_to_a_pruned_model_is_not(models, tokenizer, text_file):
    teacher = load_model(models["teacher"])
    same = load_model(models["teacher"])  # a separate copy: equality must come from the weights, not identity
    student = load_model(models["student"])
    windows = token_windows(text_file, tokenizer, 32, 4, seed=2)
    self_stats = held_out_stats(same, windows, teacher, batch_size=2)
    assert self_stats["kl_to_teacher"] == pytest.approx(0.0, abs=1e-7)
    assert self_stats["agreement"] == 1.0
    # The teacher's own figures come from the same pass; they equal the teacher evaluated alone.
    alone = held_out_stats(teacher, windows, batch_size=2)
    assert self_stats["teacher"]["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert self_stats["teacher"]["accuracy"] == alone["accuracy"]
    pruned = held_out_stats(student, windows, teacher, batch_size=2)
    assert pruned["kl_to_teacher"] > 1e-3
    assert pruned["agreement"] < 1.0
    # KL from first principles on the same windows.
    with torch.no_grad():
        tl = F.log_softmax(teacher(windows, use_cache=False).logits[:, :-1].float(), -1)
        sl = F.log_softmax(student(windows, use_cache=False).logits[:, :-1].float(), -1)
    assert pruned["kl_to_teacher"] == pytest.approx((tl.exp() * (tl - sl)).sum(-1).mean().item(), rel=1e-4)


def test_parse_tasks(tmp_path):
    specs = parse_tasks(["mmlu,arc_challenge:3", str(TASK_YAML), f"{TASKS}:2", "winogrande"])
    assert [(s.kind, s.shots) for s in specs] == [("name", 5), ("name", 3), ("file", None), ("folder", 2), ("name", 5)]
    with pytest.raises(UserError, match="not found"):
        parse_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not a .yaml"):
        parse_tasks([str(tmp_path / "notes.txt")])


def _manual_mc_accuracy(model, tokenizer) -> float:
    """Multiple-choice accuracy computed directly: argmax over choices of log p(" " + choice | question)."""
    docs = [json.loads(line) for line in (TASKS / "tiny_code_mc.jsonl").read_text().splitlines()]
    correct = 0
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx = tokenizer.encode(d["question"])
            whole = tokenizer.encode(d["question"] + " " + choice)
            cont = whole[len(ctx) :]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = F.log_softmax(model(ids[:, :-1], use_cache=False).logits.float(), -1)[0]
            scores.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return correct / len(docs)


def test_local_task_yaml_runs_offline_from_any_directory(models, tokenizer, offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML names its data relative to itself, not to the working directory
    model = load_model(models["student"])
    out = run_tasks(model, tokenizer, parse_tasks([str(TASK_YAML)]), batch_size=4)
    acc = out["tasks"]["tiny_code_mc"]["acc"]
    assert 0.0 <= acc <= 1.0
    assert out["samples"]["tiny_code_mc"] == 8
    assert acc == pytest.approx(_manual_mc_accuracy(model, tokenizer), abs=1e-9)


@pytest.fixture(scope="module")
def eval_report(models, text_file, offline, tmp_path_factory):
    """A real report: pruned student against its teacher, held-out text, a folder of local tasks, speed."""
    out = tmp_path_factory.mktemp("run") / "eval"
    settings = EvalSettings(
        tasks=[str(TASKS)],  # a folder of task YAML files
        seq_len=32,
        held_out_windows=6,
        batch_size=4,
        speed_batch=2,
        speed_len=8,
        decode_tokens=2,
        limit=6,
        speed_repeats=1,
    )
    rep = evaluate(models["student"], out, settings, teacher_path=models["teacher"], data=text_file, context=4096)
    return out, rep


def test_eval_report_teacher_vs_pruned_model(eval_report, models, text_file, tokenizer):
    out, rep = eval_report
    saved = json.loads((out / "report.json").read_text())
    assert saved["perplexity"] == pytest.approx(rep["perplexity"])
    # The report's perplexity is exp(mean token loss) over exactly the windows the settings name.
    windows = token_windows(text_file, tokenizer, 32, 6, seed=0)
    student = load_model(models["student"])
    assert saved["perplexity"] == pytest.approx(token_stats(student, windows)["perplexity"], rel=1e-5)
    assert saved["kl_to_teacher"] > 1e-3 and 0.0 <= saved["agreement"] < 1.0
    assert saved["teacher_quality"]["perplexity"] > 0
    assert saved["task_samples"]["tiny_code_mc"] == 6
    assert set(saved["tasks"]) == {"tiny_code_mc"} and 0 <= saved["tasks"]["tiny_code_mc"]["acc"] <= 1
    assert set(saved["teacher_tasks"]) == {"tiny_code_mc"}
    for who in ("model", "teacher"):
        s = saved["speed"][who]
        assert s["prefill_tokens_per_s"] > 0 and s["decode_tokens_per_s"] > 0
        assert s["peak_memory_bytes"] >= s["weights_bytes"] > 0
        assert s["prefill_tokens_per_s"] == pytest.approx(2 * 8 / s["prefill_s"])
        assert s["decode_tokens_per_s"] == pytest.approx(2 * 2 / s["decode_s"])
    assert saved["speed"]["model"]["weights_bytes"] == sum(p.numel() * 4 for p in student.parameters())
    arch = saved["architecture"]
    assert arch["model"]["params"] == sum(p.numel() for p in student.parameters())
    assert arch["teacher"]["params"] > arch["model"]["params"]
    assert arch["model"]["context"] == 4096 and arch["model"]["flops_per_token"]["decode"] > 0
    assert saved["settings"]["seq_len"] == 32 and saved["settings"]["windows"] == 6
    assert saved["distill"]["points"] == 4
    assert set(saved["plots"]) == {"quality.png", "tasks.png", "speed.png", "distill.png"}
    for name in saved["plots"]:
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    md = (out / "report.md").read_text()
    assert "| tiny_code_mc | acc |" in md and "perplexity" in md and "prefill tokens/s" in md
    assert "![tasks](tasks.png)" in md


def test_cli_eval_and_user_errors(models, text_file, tmp_path):
    out = tmp_path / "rep"
    student = str(models["student"])
    args = ["eval", student, "--teacher", student, "--data", str(text_file), "--seq-len", "24"]
    code, stdout, stderr = run_cli([*args, "--held-out-windows", "3", "--no-speed", "-o", str(out)])
    assert code == 0, stderr
    rep = json.loads((out / "report.json").read_text())
    # The model against itself: KL exactly zero, every greedy token agrees.
    assert rep["kl_to_teacher"] == pytest.approx(0.0, abs=1e-7) and rep["agreement"] == 1.0
    assert rep["teacher_quality"]["perplexity"] == pytest.approx(rep["perplexity"]) and rep["perplexity"] > 1
    assert rep["plots"] == ["quality.png", "distill.png"] and rep["speed"] == {} and (out / "report.md").is_file()
    # User errors: one line, exit 2, nothing written.
    bad = tmp_path / "bad"
    for args in (
        ["eval", str(tmp_path / "nope"), "-o", str(bad)],
        ["eval", str(models["student"]), "--tasks", str(tmp_path / "missing.yaml"), "-o", str(bad)],
        ["eval", str(models["student"]), "--data", str(tmp_path / "none.txt"), "-o", str(bad)],
        ["eval", str(models["student"]), "--no-speed", "-o", str(bad)],
        ["eval", str(models["student"]), "--data", str(text_file), "-o", str(out)],  # exists, no --overwrite
    ):
        code, _, stderr = run_cli(args)
        assert code == 2, (args, stderr)
        assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
        assert not bad.exists()
    assert json.loads((out / "report.json").read_text()) == rep
    code, stdout, _ = run_cli(["eval", "--help"])
    assert code == 0 and "Example" in stdout


def test_decode_loop_reproduces_generate_and_speed_figures(models):
    """The timed decode loop really decodes: its greedy tokens are `generate`'s."""
    from minipuzzle.evaluate.speed import greedy_decode, measure_speed

    model = load_model(models["student"])
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(4))
    tokens, seconds = greedy_decode(model, ids, 5)
    ref = model.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, ref[:, 12:]) and seconds > 0
    s = measure_speed(model, batch=2, prompt_len=12, decode_tokens=3, repeats=1)
    assert s["prefill_tokens_per_s"] == pytest.approx(24 / s["prefill_s"])
    assert s["decode_tokens_per_s"] == pytest.approx(6 / s["decode_s"])
    # Repeated runs: the median lies within the slowest and fastest repeat.
    s = measure_speed(model, batch=2, prompt_len=12, decode_tokens=3, repeats=3)
    for part in ("prefill", "decode"):
        lo, hi = s[f"{part}_tokens_per_s_range"]
        assert lo <= s[f"{part}_tokens_per_s"] <= hi


def _per_layer_cpu_map(model) -> dict[str, str]:
    """A device map that names every block (all on the CPU): accelerate's hooks run between them as they would
    between GPUs."""
    n = model.config.num_hidden_layers
    return {"model.embeddings": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)}, "model.norm_f": "cpu",
            "lm_head": "cpu"}  # fmt: skip


def test_device_mapped_and_one_at_a_time_eval_give_the_plain_figures(models, tokenizer, text_file, offline):
    """A model loaded through accelerate's device map (dispatched with hooks, every block placed by name), and a
    teacher recorded first and freed (its final states and head kept for the KL), give the figures of the plain
    path: held-out statistics with a teacher, lm-eval tasks and greedy decoding."""
    from minipuzzle.evaluate.placement import load_mapped
    from minipuzzle.evaluate.runner import record_teacher
    from minipuzzle.evaluate.speed import greedy_decode

    teacher, student = load_model(models["teacher"]), load_model(models["student"])
    mapped_t = load_mapped(models["teacher"], torch.float32, _per_layer_cpu_map(teacher), force_hooks=True)
    mapped_s = load_mapped(models["student"], torch.float32, _per_layer_cpu_map(student), force_hooks=True)
    assert hasattr(mapped_s.model.layers[0], "_hf_hook")  # accelerate's dispatch ran
    windows = token_windows(text_file, tokenizer, 32, 5, seed=3)
    plain = held_out_stats(student, windows, teacher, batch_size=2)
    assert plain["kl_to_teacher"] > 1e-3
    rec = record_teacher(mapped_t, windows, batch_size=2)
    for got in (held_out_stats(mapped_s, windows, mapped_t, batch_size=2), held_out_stats(mapped_s, windows, rec, 2)):
        assert got.pop("teacher") == pytest.approx(plain["teacher"], rel=1e-6)
        assert got == pytest.approx({k: v for k, v in plain.items() if k != "teacher"}, rel=1e-6)
    specs = parse_tasks([str(TASK_YAML)])
    got, want = (run_tasks(m, tokenizer, specs, batch_size=4)["tasks"]["tiny_code_mc"] for m in (mapped_s, student))
    assert got == pytest.approx(want)
    ids = windows[:2, :8]
    assert torch.equal(greedy_decode(mapped_s, ids, 4)[0], greedy_decode(student, ids, 4)[0])


def test_eval_runs_its_memory_plan(models, text_file, tmp_path, monkeypatch):
    """The hardware decides how eval runs: on a device too small for teacher and student together the teacher is
    recorded first and freed (the same figures as both resident); the plan's held-out batch reaches the pass."""
    import minipuzzle.evaluate.runner as runner
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import EvalShape, eval_memory, model_facts

    st = EvalSettings(seq_len=32, held_out_windows=6, batch_size=4, speed=False)
    (lay, _), (t_lay, _) = model_facts(str(models["student"])), model_facts(str(models["teacher"]))
    shape = EvalShape(seq_len=32, held_out_windows=6, batch_size=4, speed=False)

    def need(hw, teacher):  # at a batch of one window, the least either way needs
        one = shape.model_copy(update={"batch_size": 1})
        return eval_memory(lay, teacher, hw, one, stored_bytes=4).parts[0].device_total

    big = Hardware(device="cpu", gpu_memory="64GiB")
    both, alone = need(big, t_lay), need(big, None)
    small = Hardware(device="cpu", gpu_memory=int((both - 1) / 0.9))
    plan = eval_memory(lay, t_lay, small, shape, stored_bytes=4).parts[0]
    assert alone < both and plan.fits and plan.geometry.sequential
    seen = []
    real_stats, real_record = runner.held_out_stats, runner.record_teacher
    monkeypatch.setattr(runner, "held_out_stats", lambda m, w, t, b, p: seen.append(("stats", b)) or
                        real_stats(m, w, t, b, p))  # fmt: skip
    monkeypatch.setattr(runner, "record_teacher", lambda t, w, b, p: seen.append(("record", b)) or
                        real_record(t, w, b, p))  # fmt: skip
    # Hand count (float32 on the CPU, 32-token windows, V = 320, h = 64). Both resident on 64 GiB: the settings'
    # batch of 4. The small device is one byte short of both models at one window; one model at a time frees the
    # student's 4 x 147,176 B of weights but keeps the teacher's LM head for the KL (320 x 64 x 4 = 81,920 B) and
    # its final states on the host (6 x 32 x 64 x 4 = 49,152 B): 457,632 B to spare, less than a second window
    # costs: 32 tokens x (2 x 64 x 4 B of final states + 18,784 B of the widest layer's forward, a bound the memory
    # terms' tests check against the allocator) + a 32 x 320 logits chunk in 6 float32 buffers and a float32 copy
    # = 904,192 B.
    assert (lay.num_params(), t_lay.num_params()) == (147_176, 172_960)
    reps = {}
    for name, hw, batch in (("together", big, 4), ("sequential", small, 1)):
        seen.clear()
        reps[name] = evaluate(models["student"], tmp_path / name, st, teacher_path=models["teacher"], data=text_file,
                              device="cpu", hardware=hw)  # fmt: skip
        assert seen == ([("record", batch)] if name == "sequential" else []) + [("stats", batch)]
    for k in ("perplexity", "kl_to_teacher", "agreement"):
        assert reps["sequential"][k] == pytest.approx(reps["together"][k], rel=1e-6)
    assert reps["sequential"]["teacher_quality"] == pytest.approx(reps["together"]["teacher_quality"], rel=1e-6)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tokenizer):
    """A tiny mixture-of-experts checkpoint, its routed experts stored one tensor each (as the hub stores them)."""
    from minipuzzle.testing import tiny_moe_layout

    path = tmp_path_factory.mktemp("moe") / "moe"
    return save_model(random_model(tiny_moe_layout(), seed=5), path, tokenizer=tokenizer, max_shard_bytes=40_000)


def _loaded_blocks(model) -> list[list[bool]]:
    """Filled as `model` runs: for each block's forward, which blocks hold real weights then (read from the mixers'
    pre-hooks, which run inside the blocks' offloading hooks)."""
    seen, layers = [], model.model.layers
    for layer in layers:
        layer.mixer.register_forward_pre_hook(lambda m, a: seen.append([not x.norm.weight.is_meta for x in layers]))
    return seen


def test_offloaded_model_reads_one_block_at_a_time_and_gives_the_in_memory_figures(tiny_checkpoint, models, tokenizer,
                                                                                   text_file):  # fmt: skip
    """In both weight-name styles, a model offloaded to its checkpoint holds no weights but the running block's
    (read just before it, dropped after), and gives the in-memory held-out figures against an offloaded teacher
    recorded first; the placement helpers see the CPU it computes on."""
    from minipuzzle.evaluate.placement import compute_devices, head_copy, input_device, load_offloaded
    from minipuzzle.evaluate.runner import record_teacher

    cpu = torch.device("cpu")
    model, teacher = (load_offloaded(p, torch.float32, cpu) for p in (tiny_checkpoint, models["teacher"]))
    windows = token_windows(text_file, tokenizer, 32, 5, seed=4)
    seen = _loaded_blocks(model)
    got = held_out_stats(model, windows, record_teacher(teacher, windows, 2), 2)
    n = model.config.num_hidden_layers
    assert seen == [[j == i for j in range(n)] for i in range(n)] * 3  # 5 windows in batches of 2
    assert all(p.is_meta for m in (model, teacher) for p in m.parameters())  # nothing stays loaded
    plain = load_model(tiny_checkpoint)
    want = held_out_stats(plain, windows, load_model(models["teacher"]), 2)
    assert got.pop("teacher") == pytest.approx(want.pop("teacher"), rel=1e-6)
    assert got == pytest.approx(want, rel=1e-6) and want["kl_to_teacher"] > 1e-3
    assert torch.equal(head_copy(model).weight, plain.lm_head.weight)
    assert input_device(model) == cpu and compute_devices(model) == [cpu]


def test_offloaded_moe_model_merges_experts_and_keeps_routers_in_float32(moe_checkpoint, tokenizer, text_file):
    """An offloaded bf16 mixture-of-experts model reads its per-expert tensors as the 3-D expert weights in bf16
    and its routers in float32 (as `fill_weights` loads them), and gives the in-memory bf16 model's figures
    against the float32 one."""
    from minipuzzle.evaluate.placement import load_offloaded
    from minipuzzle.evaluate.runner import record_teacher

    model = load_offloaded(moe_checkpoint, torch.bfloat16, torch.device("cpu"))
    teacher = load_offloaded(moe_checkpoint, torch.float32, torch.device("cpu"))
    dtypes = []
    for layer in model.model.layers:
        if hasattr(layer.mixer, "gate"):
            layer.mixer.register_forward_pre_hook(lambda m, a: dtypes.append(
                (m.gate.weight.dtype, m.gate.e_score_correction_bias.dtype, m.experts.up_proj.dtype, m.experts.up_proj.ndim)))  # fmt: skip
    windows = token_windows(text_file, tokenizer, 32, 4, seed=5)
    got = held_out_stats(model, windows, record_teacher(teacher, windows, 2), 2)
    assert dtypes == [(torch.float32, torch.float32, torch.bfloat16, 3)] * 4  # 2 MoE layers, 2 batches
    want = held_out_stats(load_model(moe_checkpoint, torch.bfloat16), windows, load_model(moe_checkpoint), 2)
    assert got.pop("teacher") == pytest.approx(want.pop("teacher"), rel=1e-6)
    assert got == pytest.approx(want, rel=1e-6) and want["kl_to_teacher"] > 0


def _offload_hardware(lay: Layout, t_lay: Layout, st: EvalSettings, device: str, dtype: str = "auto"):
    """Hardware (one device) that holds eval's offloaded plan at a batch of one window: the plan on a device of
    one byte is the offloaded one, and its need sizes the device."""
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import USABLE, eval_stage

    def hw(mem: int) -> Hardware:
        return Hardware(device=device, gpu_memory=mem, gpus_per_node=1)

    one = st.model_copy(update={"batch_size": 1, "speed": False})
    need = max(p.device_total for p in eval_stage(lay, t_lay, hw(1), one, dtype=dtype, stored_bytes=4).parts)
    return hw(int(need / USABLE) + 2)


def test_eval_offloads_when_no_whole_model_fits(models, text_file, tmp_path, monkeypatch, offline):
    """On a device that holds neither model whole eval offloads both, one after the other, and gives the in-memory
    report's figures, lm-eval tasks included; with speed on it refuses in one line before loading or writing."""
    import minipuzzle.evaluate.placement as placement
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import eval_stage, model_facts

    st = EvalSettings(seq_len=32, held_out_windows=6, batch_size=4, speed=False, tasks=[str(TASK_YAML)], limit=6)
    (lay, _), (t_lay, _) = model_facts(str(models["student"])), model_facts(str(models["teacher"]))
    small = _offload_hardware(lay, t_lay, st, "cpu")
    plan = eval_stage(lay, t_lay, small, st, dtype="float32", stored_bytes=4)
    assert plan.fits and all(p.geometry.streaming and p.geometry.sequential for p in plan.parts)
    offloaded, real = [], placement.load_offloaded
    monkeypatch.setattr(placement, "load_offloaded", lambda *a: offloaded.append(a[0]) or real(*a))
    reps = {name: evaluate(models["student"], tmp_path / name, st, teacher_path=models["teacher"], data=text_file,
                           device="cpu", hardware=hw)
            for name, hw in (("offloaded", small), ("in memory", Hardware(device="cpu", gpu_memory="64GiB")))}  # fmt: skip
    assert offloaded == [models["teacher"], models["student"]]
    off, mem = reps["offloaded"], reps["in memory"]
    for k in ("perplexity", "kl_to_teacher", "agreement", "tokens", "teacher_quality"):
        assert off[k] == pytest.approx(mem[k], rel=1e-6), k
    for k in ("tasks", "teacher_tasks"):
        assert off[k]["tiny_code_mc"] == pytest.approx(mem[k]["tiny_code_mc"], rel=1e-6)
    assert off["task_samples"] == {"tiny_code_mc": 6} and off["kl_to_teacher"] > 1e-3
    with pytest.raises(UserError, match=r"^eval \(speed\) does not fit: .*--no-speed"):
        evaluate(models["student"], tmp_path / "speed", st.model_copy(update={"speed": True}),
                 teacher_path=models["teacher"], data=text_file, device="cpu", hardware=small)  # fmt: skip
    assert len(offloaded) == 2 and not (tmp_path / "speed").exists()


def test_cli_refuses_speed_on_an_offloaded_model(models, text_file, tmp_path):
    """`eval --gpu-memory` on a GPU that holds no whole model: refused in one line naming --no-speed, exit 2,
    nothing written; with --no-speed the same command runs."""
    from minipuzzle.memory import model_facts

    st = EvalSettings(seq_len=24, held_out_windows=3)
    (lay, _), (t_lay, _) = model_facts(str(models["student"])), model_facts(str(models["teacher"]))
    mem = str(_offload_hardware(lay, t_lay, st, "cuda").gpu_memory)
    out = tmp_path / "rep"
    args = ["eval", str(models["student"]), "--teacher", str(models["teacher"]), "--data", str(text_file),
            "--seq-len", "24", "--held-out-windows", "3", "--gpu-memory", mem, "--gpus", "1", "-o", str(out)]  # fmt: skip
    code, _, err = run_cli(args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: eval (speed) does not fit: ") and "--no-speed" in err
    assert not out.exists()
    code, _, err = run_cli([*args, "--no-speed"])
    assert code == 0, err
    assert json.loads((out / "report.json").read_text())["speed"] == {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offloaded_model_on_cuda_matches_the_resident_one_and_frees_its_blocks(tiny_checkpoint, tokenizer, text_file):
    """On a GPU an offloaded bf16 model computes there (blocks copied from the host each forward) with the resident
    model's figures, and holds no weights on the GPU afterwards."""
    from minipuzzle.evaluate.placement import compute_devices, input_device, load_offloaded
    from minipuzzle.evaluate.runner import record_teacher

    windows = token_windows(text_file, tokenizer, 64, 4, seed=6)
    whole = load_model(tiny_checkpoint, torch.bfloat16, "cuda")
    want = held_out_stats(whole, windows, whole, 2)
    nbytes = sum(p.numel() * 2 for p in whole.parameters())
    del whole
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_offloaded(tiny_checkpoint, torch.bfloat16, torch.device("cuda"))
    assert input_device(model).type == "cuda" and [d.type for d in compute_devices(model)] == ["cuda"]
    got = held_out_stats(model, windows, record_teacher(model, windows, 2), 2)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-3) and got["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert torch.cuda.memory_allocated() - before < nbytes / 4  # no more than stray buffers (cuBLAS's)
