"""Distillation losses, chunking, evaluation sums, schedule and the resumable data stream."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minipuzzle.distill.loop import _optimizer
from minipuzzle.distill.losses import DistillObjective
from minipuzzle.distill.stream import WindowStream
from minipuzzle.distill.toy import drop_layers
from minipuzzle.errors import UserError
from minipuzzle.metrics import forward_kl, reverse_kl, token_stats, topk_kl
from minipuzzle.settings import DistillSettings
from minipuzzle.testing import random_model


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models run fastest on one thread; two threads on a shared 2-core machine mostly wait on each other.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def depth_pair():
    teacher = random_model(seed=0)
    return teacher, drop_layers(teacher, [0, 1, 2, 4, 5, 7, 8, 9])


@pytest.fixture(scope="module", params=["depth", "hidden"])
def pair(request, depth_pair):
    """A teacher and a lossy student: fewer layers, or a narrower hidden size (teacher and student hidden states
    then differ in width and only the logits are comparable)."""
    from minipuzzle.cut import Plan, cut_model

    teacher = depth_pair[0]
    if request.param == "depth":
        return depth_pair
    h = teacher.config.hidden_size
    return teacher, cut_model(teacher, Plan(layers=list(range(10)), hidden=list(range(0, h, 2))))


def test_kl_functions_match_reference():
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(12, 50, generator=gen) * 3, torch.randn(12, 50, generator=gen) * 3
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(forward_kl(t, s), ref)
    torch.testing.assert_close(reverse_kl(t, s), forward_kl(s, t))
    # ... and against torch directly, not only as the mirror of forward_kl: KL(student || teacher).
    ref_rev = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(reverse_kl(t, s), ref_rev)
    ref_t2 = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(forward_kl(t, s, 2.0), ref_t2)
    # top-k over the whole vocabulary is the forward KL; a smaller k is still >= 0 and 0 when student == teacher.
    torch.testing.assert_close(topk_kl(t, s, k=50), forward_kl(t, s))
    assert topk_kl(t, s, k=5) > 0
    # With the same logits the student's mass outside the top k makes the loss = -sum p log(sum_topk q) > 0 ...
    assert topk_kl(t, t, k=5) > 0
    # ... and a student that puts all its mass on the teacher's top k in the same proportions scores 0.
    top, idx = t.topk(5, -1)
    peaked = torch.full_like(t, -1e4).scatter(-1, idx, top)
    assert abs(topk_kl(t, peaked, k=5).item()) < 1e-4
    assert abs(forward_kl(t, t).item()) < 1e-5


def _full_loss(student, teacher, ids, lm_weight=0.0, temperature=1.0):
    """Unchunked reference: full logits of both models, T^2 x forward KL mean over all tokens (+ LM)."""
    s = student(ids, use_cache=False).logits.float().flatten(0, 1)
    with torch.no_grad():
        t = teacher(ids, use_cache=False).logits.float().flatten(0, 1)
    loss = temperature**2 * forward_kl(t, s, temperature) / s.shape[0]
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(student(ids, use_cache=False).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return loss


# lm_weight 0 takes the written-out forward-KL gradient, lm_weight > 0 the autograd-per-chunk path.
@pytest.mark.parametrize(
    "chunk,lm_weight,temperature", [(7, 0.5, 1.0), (10_000, 0.5, 1.0), (7, 0.0, 1.0), (9, 0.0, 2.0)]
)
def test_chunked_loss_and_grads_equal_full_logits(pair, chunk, lm_weight, temperature):
    teacher, student = pair
    student = copy.deepcopy(student).train()
    ids = torch.randint(0, 320, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = _full_loss(student, teacher, ids, lm_weight, temperature)
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    with torch.no_grad():
        ref_kl = forward_kl(teacher(ids, use_cache=False).logits.flatten(0, 1), student(ids, use_cache=False).logits.flatten(0, 1)) / ids.numel()
        ref_lm = F.cross_entropy(student(ids, use_cache=False).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    obj = DistillObjective(student, teacher, chunk=chunk, lm_weight=lm_weight, temperature=temperature)
    out = obj(ids)
    out["loss"].backward()
    torch.testing.assert_close(out["loss"], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["kl"], ref_kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["lm"], ref_lm, rtol=1e-5, atol=1e-6)
    assert out["kl"] > 0.01  # the pruned student is lossy
    for n, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    assert not any(p.grad is not None for p in teacher.parameters())


def test_evaluation_sums_agree_with_token_stats(pair):
    teacher, student = pair
    ids = torch.randint(0, 320, (4, 20), generator=torch.Generator().manual_seed(2))
    ref = token_stats(student, ids, teacher=teacher)
    obj = DistillObjective(student, teacher, chunk=13)
    nll, kl, acc, agree, n = obj(ids, evaluate=True).tolist()
    assert n == ref["tokens"]
    assert math.isclose(nll / n, ref["loss"], rel_tol=1e-5)
    assert math.isclose(kl / n, ref["kl_to_teacher"], rel_tol=1e-4)
    assert math.isclose(acc / n, ref["accuracy"]) and math.isclose(agree / n, ref["agreement"])


def test_hidden_cosine_loss_needs_equal_hidden_sizes():
    from minipuzzle.cut import Plan, cut_model

    teacher = random_model(seed=0)
    narrow = cut_model(teacher, Plan(layers=list(range(10)), hidden=list(range(32))))
    with pytest.raises(UserError, match="hidden size 32 differs from the teacher's 64"):
        DistillObjective(narrow, teacher, hidden_weight=1.0, layer_pairs=[(0, 0)])
    DistillObjective(narrow, teacher, hidden_weight=0.0)  # logits alone are fine


def test_hidden_cosine_loss_through_layer_map(depth_pair):
    teacher, student = depth_pair
    same = DistillObjective(copy.deepcopy(teacher), teacher, hidden_weight=1.0, layer_pairs=[(0, 0), (5, 5)])
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    out = same(ids)
    assert abs(out["hidden"].item()) < 1e-5 and abs(out["kl"].item()) < 1e-5
    # Student layer 3 is teacher layer 4 (layer 3 was dropped): the map pairs them; the outputs differ.
    obj = DistillObjective(copy.deepcopy(student), teacher, hidden_weight=2.0, layer_pairs=[(0, 0), (3, 4)])
    out = obj(ids)
    assert out["hidden"] > 1e-4
    torch.testing.assert_close(out["loss"], out["kl"] + 2.0 * out["hidden"], rtol=1e-5, atol=1e-6)
    # Layer 0 is shared exactly (cos = 1): the hidden term is half of layer 3's cosine distance.
    from minipuzzle.distill.losses import cosine_distance

    cap = {}
    hooks = [
        obj.student.model.layers[3].register_forward_hook(lambda m, i, o: cap.__setitem__("s", o)),
        teacher.model.layers[4].register_forward_hook(lambda m, i, o: cap.__setitem__("t", o)),
    ]
    with torch.no_grad():
        obj.student(ids), teacher(ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out["hidden"], cosine_distance(cap["s"], cap["t"]) / 2, rtol=1e-5, atol=1e-7)
    out["loss"].backward()
    assert sum(p.grad.abs().sum() for p in obj.student.model.layers[3].parameters()) > 0


def test_reverse_and_topk_objectives_train(pair):
    teacher, student = pair
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(4))
    for loss in ("reverse_kl", "topk_kl"):
        obj = DistillObjective(copy.deepcopy(student), teacher, loss=loss, top_k=8, temperature=2.0, chunk=9)
        out = obj(ids)
        assert out["loss"] > 0 and out["kl"] > 0
        assert not torch.isclose(out["loss"], out["kl"] * 4)
        out["loss"].backward()


def _lrs(cfg: DistillSettings) -> list[float]:
    """The LR each of cfg.max_steps optimizer steps trains with."""
    opt, sched = _optimizer(cfg, torch.nn.Linear(2, 2))
    out = []
    for _ in range(cfg.max_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_with_warmup():
    cfg = DistillSettings(teacher="t", student="s", data="d", output="o", max_steps=101, warmup=10, min_lr_ratio=0.1,
                        lr=2.0)  # fmt: skip
    f = [x / 2.0 for x in _lrs(cfg)]
    assert f[0] == pytest.approx(1 / 10) and f[8] == pytest.approx(9 / 10)
    assert f[9] == pytest.approx(1.0) and f[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 46 / 91)))
    assert cfg.warmup_note() is None


def test_warmup_longer_than_the_run_is_clamped():
    for warmup in (60, 100):
        cfg = DistillSettings(teacher="t", student="s", data="d", output="o", max_steps=60, warmup=warmup)
        assert cfg.warmup_steps() == 6 and "warming up for 6 steps" in cfg.warmup_note()
        lrs = _lrs(cfg)
        peak = lrs.index(max(lrs))
        assert peak == 5 and all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1]))
        assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))
        assert lrs[-1] == pytest.approx(0.1 * max(lrs))


def test_config_errors():
    base = dict(teacher="t", student="s", data="d", output="o")
    with pytest.raises(UserError, match="--max-steps or --tokens"):
        DistillSettings(**base)
    with pytest.raises(UserError, match="multiple of --grad-accum"):
        DistillSettings(**base, max_steps=1, batch_size=6, grad_accum=4)
    with pytest.raises(UserError, match="unknown --loss"):
        DistillSettings(**base, max_steps=1, loss="mse")
    with pytest.raises(UserError, match="hidden-map"):
        DistillSettings(**base, max_steps=1, hidden_map="0-1")
    assert DistillSettings(**base, tokens=10_000, seq_len=100, batch_size=8).max_steps == 13


def test_window_stream_resumes_and_wraps(tokenizer, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    from minipuzzle.testing import stdlib_text_files

    for i, f in enumerate(stdlib_text_files(3)):
        (docs / f"{i}.txt").write_text(f.read_text()[:1000])
    full = WindowStream(str(docs), tokenizer, 64)
    held = full.take(3)
    full.mark_start()
    ref = full.take(60)  # more than one epoch: wraps to the windows after the held-out ones
    assert full.state.epoch >= 1

    s = WindowStream(str(docs), tokenizer, 64)
    assert torch.equal(s.take(3), held)
    s.mark_start()
    got = [s.take(7)]
    st = copy.deepcopy(s.state_dict())
    resumed = WindowStream(str(docs), tokenizer, 64, state=WindowStream.state_from(st))
    while sum(len(g) for g in got) < 60:
        got.append(resumed.take(min(11, 60 - sum(len(g) for g in got))))
    assert torch.equal(torch.cat(got), ref)
    # no held-out window is ever trained on
    assert not any(torch.equal(w, h) for w in ref for h in held)
