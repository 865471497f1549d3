"""Importance scoring on tiny random models: exact against naive recomputation, streamed == in-memory, dead units
score zero, resumable, and the `score` command."""

import gc
import json
import weakref

import pytest
import torch
import torch.nn.functional as F

from minipuzzle.errors import UserError
from minipuzzle.score.depth import depth_scores
from minipuzzle.score.layerwise import ModelStack, StreamedStack, iter_layerwise
from minipuzzle.score.scores import Scores
from minipuzzle.score.scoring import score_checkpoint, score_model
from minipuzzle.score.width import width_scores
from minipuzzle.testing import random_model, run_cli, save_model

WIDTH = ("ffn", "mamba_heads", "mamba_head_dim", "attn_heads")


def windows(n=4, t=24, seed=1, vocab=320):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def final_hidden(stack, ids, keep=None):
    return torch.cat([h for _, h in iter_layerwise(stack, ids, keep, batch_size=3)])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_layerwise_matches_model_forward(tiny_model, impl):
    old = tiny_model.config._attn_implementation
    tiny_model.config._attn_implementation = impl
    try:
        ids = windows(3)
        with torch.no_grad():
            ref = tiny_model(ids, use_cache=False).logits
        stack = ModelStack(tiny_model)
        got = stack.logits(final_hidden(stack, ids))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # causality: changing the last token changes nothing before it
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % 320
        got2 = stack.logits(final_hidden(stack, ids2))
        torch.testing.assert_close(got2[:, :-1], got[:, :-1], rtol=0, atol=1e-6)
    finally:
        tiny_model.config._attn_implementation = old


def test_depth_prefix_reuse_equals_naive_drop_one(tiny_model):
    stack = ModelStack(tiny_model)
    ids = windows(3)
    full = final_hidden(stack, ids)
    n = stack.num_layers
    naive_mse, naive_kl = [], []
    ref_lp = F.log_softmax(stack.logits(full), -1)
    for i in range(n):
        h = final_hidden(stack, ids, [j for j in range(n) if j != i])
        naive_mse.append((h - full).pow(2).mean())
        lp = F.log_softmax(stack.logits(h), -1)
        naive_kl.append((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())
    got = depth_scores(stack, ids, "mse_hidden", chunk_rows=2, batch_size=2)
    torch.testing.assert_close(got, torch.stack(naive_mse), rtol=1e-4, atol=1e-7)
    got_kl = depth_scores(stack, ids, "kl_logits", chunk_rows=3, batch_size=3)
    torch.testing.assert_close(got_kl, torch.stack(naive_kl), rtol=1e-4, atol=1e-7)
    assert (got > 0).all()


def test_other_depth_metrics_match_definitions(tiny_model):
    stack = ModelStack(tiny_model)
    ids = windows(2)
    n = stack.num_layers
    full = final_hidden(stack, ids)
    ref = stack.logits(full)
    ref_loss = F.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), ids[:, 1:].reshape(-1))
    nmse, dloss = [], []
    for i in range(n):
        lg = stack.logits(final_hidden(stack, ids, [j for j in range(n) if j != i]))
        nmse.append((lg - ref).pow(2).sum() / ref.pow(2).sum())
        dloss.append(F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)) - ref_loss)
    torch.testing.assert_close(depth_scores(stack, ids, "nmse_logits", chunk_rows=2), torch.stack(nmse))
    torch.testing.assert_close(
        depth_scores(stack, ids, "lm_loss", chunk_rows=1), torch.stack(dloss), atol=1e-5, rtol=1e-4
    )
    # block influence: 1 - cos between each layer's input and output in the full model
    with torch.no_grad():
        hs = tiny_model.model(ids, output_hidden_states=True).hidden_states
    bi = depth_scores(stack, ids, "block_influence")
    for i in range(n):
        # hidden_states[i] is layer i's input; the last entry is after norm_f, so rebuild layer outputs
        x = hs[i]
        y = tiny_model.model.layers[i](x) if i == n - 1 else hs[i + 1]
        want = (1 - F.cosine_similarity(x, y, dim=-1)).mean()
        torch.testing.assert_close(bi[i], want, rtol=1e-4, atol=1e-6)


def test_streamed_equals_in_memory(tiny_checkpoint, tiny_model):
    ids = windows(3)
    mem = score_model(tiny_model, ids, ids, progress=False, batch_size=2)
    streamed = score_checkpoint(tiny_checkpoint, ids, ids, stream=True, progress=False, batch_size=3)
    loaded = score_checkpoint(tiny_checkpoint, ids, ids, stream=False, progress=False)
    assert streamed.meta.settings.streamed and not loaded.meta.settings.streamed
    for other in (streamed, loaded):
        torch.testing.assert_close(other["depth"], mem["depth"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(other["hidden"], mem["hidden"], rtol=1e-6, atol=1e-9)
        for axis in WIDTH:
            assert set(other[axis]) == set(mem[axis])
            for i, t in mem[axis].items():
                torch.testing.assert_close(other[axis][i], t, rtol=1e-6, atol=1e-9)


def test_width_scores_match_hand_computation(tiny_model):
    """Default statistic (mean |activation| over the sequence, L2 over rows) on the tensor each axis reads. FFN:
    relu(up x)^2; attention: the norm of each head's o_proj output; Mamba: x part of in_proj, L2 within head /
    across heads; hidden: every pre-norm and norm_f output, summed over norms. Captured on model(ids)."""
    m, ids = tiny_model, windows(3)
    cap = {}
    hooks = [m.model.norm_f.register_forward_hook(lambda mo, a, o: cap.__setitem__(("hid", -1), o))]
    for i, blk in enumerate(m.model.layers):
        hooks.append(blk.norm.register_forward_hook(lambda mo, a, o, i=i: cap.__setitem__(("hid", i), o)))
        if blk.block_type == "mlp":
            hooks.append(blk.mixer.act_fn.register_forward_hook(lambda mo, a, o, i=i: cap.__setitem__(("ffn", i), o)))
        elif blk.block_type == "full_attention":
            hooks.append(
                blk.mixer.o_proj.register_forward_pre_hook(lambda mo, a, i=i: cap.__setitem__(("att", i), a[0]))
            )
        else:
            hooks.append(blk.mixer.in_proj.register_forward_hook(lambda mo, a, o, i=i: cap.__setitem__(("mx", i), o)))
    with torch.no_grad():
        m(ids)
    for h in hooks:
        h.remove()
    got = width_scores(ModelStack(m), ids, batch_size=2)
    cfg = m.config

    def stat(x):
        return x.abs().mean(1).pow(2).sum(0).sqrt()

    hidden = 0
    for (kind, i), act in cap.items():
        if kind == "hid":
            hidden = hidden + stat(act)
        elif kind == "ffn":
            torch.testing.assert_close(got["ffn"][i], stat(act), rtol=1e-5, atol=1e-7)
        elif kind == "att":
            w = m.model.layers[i].mixer.o_proj.weight
            d = cfg.head_dim
            per_head = torch.stack(
                [(act[..., k * d : (k + 1) * d] @ w[:, k * d : (k + 1) * d].T).norm(dim=-1) for k in range(8)], -1
            )
            torch.testing.assert_close(got["attn_heads"][i], stat(per_head), rtol=1e-4, atol=1e-6)
        else:
            inner = cfg.mamba_num_heads * cfg.mamba_head_dim
            c = stat(act[..., inner : 2 * inner]).view(cfg.mamba_num_heads, -1)
            torch.testing.assert_close(got["mamba_heads"][i], c.norm(dim=1), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got["mamba_head_dim"][i], c.norm(dim=0), rtol=1e-5, atol=1e-7)
    assert len(cap) == 2 * cfg.num_hidden_layers + 1
    torch.testing.assert_close(got["hidden"], hidden, rtol=1e-5, atol=1e-6)


def test_dead_units_score_exactly_zero():
    m = random_model(seed=5)
    cfg = m.config
    d_head, d_m, inner = cfg.head_dim, cfg.mamba_head_dim, cfg.mamba_num_heads * cfg.mamba_head_dim
    with torch.no_grad():
        m.model.embeddings.weight[:, 7] = 0  # hidden channel 7: nothing writes into it
        for blk in m.model.layers:
            mx = blk.mixer
            if blk.block_type == "mlp":
                mx.down_proj.weight[7] = 0
                mx.up_proj.weight[5] = 0  # FFN channel 5
                mx.down_proj.weight[:, 5] = 0
            elif blk.block_type == "full_attention":
                mx.o_proj.weight[7] = 0
                mx.q_proj.weight[3 * d_head : 4 * d_head] = 0  # query head 3
                mx.o_proj.weight[:, 3 * d_head : 4 * d_head] = 0
            else:
                mx.out_proj.weight[7] = 0
                head = slice(inner + 2 * d_m, inner + 3 * d_m)  # Mamba head 2 (x part of in_proj)
                mx.in_proj.weight[head] = 0
                mx.out_proj.weight[:, 2 * d_m : 3 * d_m] = 0
                mx.in_proj.weight[inner + 6 : 2 * inner : d_m] = 0  # head channel 6 in every head
                mx.out_proj.weight[:, 6::d_m] = 0
    s = score_model(m, None, windows(3), axes=["ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "hidden"],
                    progress=False)  # fmt: skip
    checks = [("ffn", 5), ("mamba_heads", 2), ("mamba_head_dim", 6), ("attn_heads", 3)]
    for axis, unit in checks:
        for t in s[axis].values():
            assert t[unit].item() == 0.0
            assert (torch.cat([t[:unit], t[unit + 1 :]]) > 0).all()
    assert s["hidden"][7].item() == 0.0 and (s["hidden"] > 0).sum() == cfg.hidden_size - 1


WILD, CONST = 10, 20  # hidden channels: +-20 by token parity (zero mean over a row), and a constant 0.4


def plant_wild_and_constant_units(m):
    """On every axis, unit "wild" reads only the zero-mean hidden channel WILD and unit "const" only the constant
    channel CONST: FFN 0 / 1, Mamba head 0 / 1, Mamba head channel 2 / 3 (in heads 2..7), attention head 4 / 0
    (kv group 1 / 0, same o_proj columns). WILD and CONST are carried untouched through the residual stream, and
    nothing else reads WILD or feeds the planted units' outputs back, so no other channel depends on the parity
    and the signed mean of WILD over an alternating row stays near zero in every layer."""
    cfg = m.config
    inner, p, d = cfg.mamba_num_heads * cfg.mamba_head_dim, cfg.mamba_head_dim, cfg.head_dim

    def read(w, rows, ch):
        w[rows] = 0
        w[rows, ch] = 1

    with torch.no_grad():
        emb = m.model.embeddings.weight
        emb[:, WILD] = 20.0 * (1.0 - 2.0 * (torch.arange(emb.shape[0]) % 2))
        emb[:, CONST] = 0.4
        m.model.norm_f.weight[[WILD, CONST]] = 1
        for blk in m.model.layers:
            mx = blk.mixer
            blk.norm.weight[[WILD, CONST]] = 1
            for name, w in mx.named_parameters():
                if w.ndim == 2 and name.split(".")[0] in ("out_proj", "o_proj", "down_proj"):
                    w[[WILD, CONST]] = 0
                elif w.ndim == 2 and w.shape[1] == cfg.hidden_size:
                    w[:, WILD] = 0
            if blk.block_type == "mlp":
                read(mx.up_proj.weight, [0], WILD)
                read(mx.up_proj.weight, [1], CONST)
                mx.down_proj.weight[:, :2] = 0
            elif blk.block_type == "full_attention":
                read(mx.v_proj.weight, list(range(d)), CONST)
                read(mx.v_proj.weight, list(range(d, 2 * d)), WILD)
                mx.o_proj.weight.mul_(1e-3)  # every head reads a planted channel: keep their writes negligible
                mx.o_proj.weight[:, 4 * d : 5 * d] = mx.o_proj.weight[:, :d]
            else:
                w = mx.in_proj.weight
                read(w, list(range(inner, inner + p)), WILD)
                read(w, list(range(inner + p, inner + 2 * p)), CONST)
                read(w, [inner + h * p + 2 for h in range(2, 8)], WILD)
                read(w, [inner + h * p + 3 for h in range(2, 8)], CONST)
                planted = list(range(2 * p)) + [h * p + j for h in range(2, 8) for j in (2, 3)]
                mx.conv1d.weight[planted] = 0  # the gated norm would spread the planted channels' size
                mx.conv1d.bias[planted] = 0


def test_default_width_statistic_ranks_magnitude_not_offset():
    """Minitron's mean |activation|: a zero-mean, high-variance unit outranks a small constant one on every axis.
    The signed mean flips that order on the axes whose activations are signed (hidden, Mamba x)."""
    m = random_model(seed=3)
    plant_wild_and_constant_units(m)
    t = 32
    ids = 2 * torch.randint(0, 160, (4, t), generator=torch.Generator().manual_seed(0)) + torch.arange(t) % 2
    axes = ["ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "hidden"]
    pairs = {"ffn": (0, 1), "mamba_heads": (0, 1), "mamba_head_dim": (2, 3), "attn_heads": (4, 0)}
    for agg, signed_axes_flip in (("abs_mean,l2", False), ("signed_mean,l2", True)):
        s = score_model(m, None, ids, axes=axes, progress=False, width_agg=agg)
        assert s.meta.settings.width_aggregation == agg
        assert (s["hidden"][WILD] < s["hidden"][CONST]) == signed_axes_flip
        for axis, (wild, const) in pairs.items():
            flips = signed_axes_flip and axis.startswith("mamba")
            for i, sc in s[axis].items():
                assert (sc[wild] < sc[const]) == flips, (agg, axis, i, sc[wild].item(), sc[const].item())
    assert score_model(m, None, ids, axes=axes, progress=False).meta.settings.width_aggregation == "abs_mean,l2"


class Interrupt(Exception):
    pass


class FlakyStack(ModelStack):
    """Raises after `limit` block loads, as an interruption would."""

    def __init__(self, model, limit=None):
        super().__init__(model)
        self.loads, self.limit = 0, limit

    def block(self, i):
        self.loads += 1
        if self.limit is not None and self.loads > self.limit:
            raise Interrupt
        return super().block(i)


def test_depth_resumes_after_interruption(tiny_model, tmp_path):
    ids = windows(4, t=12)
    want = depth_scores(ModelStack(tiny_model), ids, chunk_rows=4)
    n = len(tiny_model.model.layers)
    with pytest.raises(Interrupt):
        depth_scores(FlakyStack(tiny_model, limit=n + 3), ids, chunk_rows=2, resume_dir=tmp_path)
    again = FlakyStack(tiny_model)
    got = depth_scores(again, ids, chunk_rows=2, resume_dir=tmp_path)
    assert again.loads == n  # the first chunk was finished before the interruption: only the second is rerun
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # different windows do not pick up the stale partial sums
    ids9 = windows(4, t=12, seed=9)
    other = depth_scores(FlakyStack(tiny_model), ids9, chunk_rows=4, resume_dir=tmp_path)
    torch.testing.assert_close(other, depth_scores(ModelStack(tiny_model), ids9, chunk_rows=4), rtol=1e-6, atol=1e-9)


def test_streamed_block_is_released(tiny_checkpoint):
    stack = StreamedStack.open(tiny_checkpoint)
    with stack.block(2) as blk:
        assert blk.block_type == "full_attention" and blk.norm.weight.device.type == "cpu"
        weight = weakref.ref(blk.mixer.q_proj.weight)
    del blk
    gc.collect()
    # the block's weights (views of their shard's mapping) are gone with it: nothing of the layer stays mapped
    assert weight() is None


def test_scores_file_round_trip(tiny_model, tmp_path):
    s = score_model(tiny_model, windows(2), windows(2), progress=False)
    s.save(tmp_path)
    back = Scores.load(tmp_path)
    assert back.pattern == s.pattern and torch.equal(back["depth"], s["depth"]) and torch.equal(back["hidden"], s["hidden"])
    for axis in WIDTH:
        assert all(torch.equal(back[axis][i], t) for i, t in s[axis].items())
    summary = json.loads((tmp_path / "scores.json").read_text())["summary"]
    rank = summary["depth"]["ranking"]
    assert sorted(rank["mamba"]) == [i for i, c in enumerate(s.pattern) if c == "M"]
    assert s["depth"][rank["mlp"][0]] >= s["depth"][rank["mlp"][-1]]
    order = summary["attn_heads"]["order_within_groups"]["2"]
    assert len(order) == 2 and sorted(order[0]) == [0, 1, 2, 3] and sorted(order[1]) == [4, 5, 6, 7]
    # A file naming an axis that is not in the anatomy (an older spelling) is refused, not half read.
    from safetensors.torch import save_file

    save_file({"mamba_head_channels.0": torch.ones(8)}, str(tmp_path / "scores.safetensors"))
    with pytest.raises(UserError, match="mamba_head_channels"):
        Scores.load(tmp_path)


def test_scores_json_is_the_typed_artifact(tiny_model, tmp_path):
    from minipuzzle.artifacts import ScoresMeta

    s = score_model(tiny_model, windows(2), windows(2), progress=False)
    s.save(tmp_path)
    meta = ScoresMeta.read(tmp_path / "scores.json")  # the file the stage wrote validates
    assert meta == s.info() and meta.pattern == s.pattern and meta.settings.depth_samples == 2
    assert meta.depth == pytest.approx(s["depth"].tolist()) and meta.groups["mamba_heads"] == 2
    assert Scores.load(tmp_path).info() == meta  # load -> save writes the same document
    # A key the model does not know (another version's, a hand edit) is refused in one line, not dropped.
    doc = json.loads((tmp_path / "scores.json").read_text())
    (tmp_path / "scores.json").write_text(json.dumps({**doc, "calibration": "wikitext"}))
    with pytest.raises(UserError, match="calibration: unknown key") as err:
        Scores.load(tmp_path)
    assert "\n" not in str(err.value) and "scores.json" in str(err.value)
    # ... and so is a settings block that lost a field.
    del doc["settings"]["seq_len"]
    (tmp_path / "scores.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="settings.seq_len: Field required"):
        Scores.load(tmp_path)


def test_scores_put_together_without_a_scoring_run_round_trip(tmp_path):
    # Tests, benchmarks and the width pass's resume file build Scores without how-it-was-measured metadata.
    s = Scores(pattern="M-*M", depth=torch.tensor([0.4, 0.1, 0.3, 0.2]), ffn={1: torch.tensor([1.0, 0.0, 2.0])})
    s.save(tmp_path)
    back = Scores.load(tmp_path)
    assert back.info().settings is None and back.info().groups == {} and back.info().timing == {}
    assert torch.equal(back["depth"], s["depth"]) and torch.equal(back["ffn"][1], s["ffn"][1])
    assert back.info().depth == pytest.approx([0.4, 0.1, 0.3, 0.2]) and back.layer_ranking("mlp") == [1]
    # A record scores.json has no field for cannot be made, so none can be saved.
    with pytest.raises(ValueError, match="note"):
        s.meta.note = "hand-made"


def test_score_command(tmp_path, tokenizer, text_file):
    ckpt = save_model(random_model(seed=2), tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "scores"
    args = ["score", str(ckpt), "--data", str(text_file), "-o", str(out), "--samples", "2", "--seq-len", "24"]
    code, stdout, err = run_cli([*args, "--stream", "--depth-metric", "kl_logits"])
    assert code == 0, err
    assert {"scores.safetensors", "scores.json", "depth.png", "width.png"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "scores.json").read_text())
    assert meta["settings"]["depth_metric"] == "kl_logits" and meta["settings"]["streamed"] is True
    assert meta["data"]["source"] == str(text_file) and meta["data"]["depth_rows"] == 2
    assert not (tmp_path / ".scores.resume").exists()
    s = Scores.load(out)
    assert s["depth"].shape == (10,) and set(s["ffn"]) == {1, 4, 7, 9}
    # the same settings in memory give the same scores
    code, _, err = run_cli([*args, "--no-stream", "--depth-metric", "kl_logits", "-o", str(tmp_path / "s2")])
    assert code == 0, err
    torch.testing.assert_close(Scores.load(tmp_path / "s2")["depth"], s["depth"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--axes", "depth,heads"], "unknown axis 'heads'"),
        (["--depth-metric", "cosine"], "unknown depth metric"),
        (["--width-agg", "mean"], "invalid width aggregation"),
        (["--width-agg", "mean,l2"], "use abs_mean (mean of |activation|"),
        (["--width-agg", "abs_mean,median"], "invalid width aggregation"),
        (["--seq-len", "100000"], "shorter than one window"),
    ],
)
def test_score_command_user_errors(tmp_path, tokenizer, text_file, extra, needle):
    ckpt = save_model(random_model(seed=2), tmp_path / "ckpt", tokenizer=tokenizer)
    out = tmp_path / "scores"
    code, _, err = run_cli(["score", str(ckpt), "--data", str(text_file), "-o", str(out), "--samples", "2", *extra])
    assert code == 2 and needle in err and "Traceback" not in err
    assert not out.exists()


def test_score_command_empty_data(tmp_path, tokenizer):
    ckpt = save_model(random_model(seed=2), tmp_path / "ckpt", tokenizer=tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run_cli(["score", str(ckpt), "--data", str(empty), "-o", str(tmp_path / "o"), "--seq-len", "16"])
    assert code == 2 and str(empty) in err
