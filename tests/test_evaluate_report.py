"""`minipuzzle report RUN_DIR`: one self-contained HTML page built from a run folder whose stage outputs are made
here from real computations (drop-one layer scores, a candidate table ranked by KL, distillation steps, a real
evaluation report), validated as HTML and, where Chromium is installed, rendered in a headless browser."""

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_evaluate import TASK_YAML

from minipuzzle.arch import Layout
from minipuzzle.data import token_windows
from minipuzzle.distill.toy import drop_layers
from minipuzzle.errors import UserError
from minipuzzle.evaluate import build_run_report, evaluate, held_out_stats
from minipuzzle.testing import random_model, run_cli, save_model

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "area", "base", "wbr"}


class Page(HTMLParser):
    """Checks that every element is closed in order and collects section ids, images and text."""

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.ids, self.images, self.text = [], [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.ids.append(a.get("id"))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>")
    p = Page()
    p.feed(html)
    p.close()
    assert not p.errors and not p.stack, (p.errors, p.stack)
    return p


def check_images(page: Page) -> int:
    from PIL import Image

    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]  # self-contained: no file or network refs
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        img.verify()
        assert img.format == "PNG"
    return len(page.images)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer, text_file):
    """A whole run: score/ (real drop-one KL per layer), search/ (candidates that drop the least important
    layers, ranked by real KL), distill/ (real distillation steps) and eval/ (a real evaluation report)."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("ds")), raising=False)
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    teacher = random_model(seed=5)
    pattern = Layout.from_config(teacher.config).pattern
    n = len(pattern)
    tpath = save_model(teacher, run / "source", tokenizer=tokenizer)
    windows = token_windows(text_file, tokenizer, 24, 2, seed=0)

    depth = []
    for i in range(n):
        dropped = drop_layers(teacher, [j for j in range(n) if j != i])
        depth.append(held_out_stats(dropped, windows, teacher)["kl_to_teacher"])
    (run / "score").mkdir()
    save_file({"depth": torch.tensor(depth)}, str(run / "score" / "scores.safetensors"), metadata={"pattern": pattern})
    meta = {"pattern": pattern, "axes": ["depth"], "metric": "kl_drop_one", "num_samples": 2, "seq_len": 24}
    (run / "score" / "scores.json").write_text(json.dumps(meta))

    order = sorted(range(n), key=depth.__getitem__)
    candidates = []
    for k in (1, 2, 3):
        keep = sorted(set(range(n)) - set(order[:k]))
        cand = drop_layers(teacher, keep)
        lay = Layout.from_config(cand.config)
        kl = held_out_stats(cand, windows, teacher)["kl_to_teacher"]
        candidates.append({"pattern": lay.pattern, "params": lay.num_params(), "kl": kl, "keep": keep})
    chosen = candidates[1]
    student = drop_layers(teacher, chosen["keep"])
    counts = Layout.from_config(student.config).layer_counts()
    # The search stage's report shape: chosen.source / chosen.result (axis-named widths) / chosen.plan.layers.
    prune = {
        "model": str(tpath),
        "checkpoint": str(tpath),
        "budget": {"params": chosen["params"], "precision": "bf16"},
        "chosen": {
            "source": {"pattern": pattern, "params": Layout.from_config(teacher.config).num_params()},
            "result": {
                "pattern": chosen["pattern"],
                "params": chosen["params"],
                "layers": counts,
                "widths": {"ffn": 96, "hidden": 64},
            },
            "plan": {"layers": chosen["keep"]},
        },
        "candidates": [
            {"widths": {"ffn": 96}, "predicted_damage": sum(depth[i] for i in order[:k]), "params": c["params"],
             "kl": c["kl"], "measured_rank": k}
            for k, c in enumerate(candidates, 1)
        ],
        "scores": meta,
    }  # fmt: skip
    (run / "search").mkdir()
    (run / "search" / "prune_report.json").write_text(json.dumps(prune, indent=2))

    spath = save_model(student, run / "distill", tokenizer=tokenizer)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    ids = windows
    with torch.no_grad():
        tlogp = F.log_softmax(teacher(ids).logits.float(), -1)
    rows = []
    for step in range(1, 4):
        logp = F.log_softmax(student(ids).logits.float(), -1)
        kl = (tlogp.exp() * (tlogp - logp)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        rows.append(
            {"step": step, "loss": kl.item(), "kl": kl.item(), "tokens": step * ids.numel(), "val_kl": kl.item()}
        )
    (spath / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # mid-write

    evaluate(spath, tpath, data=text_file, tasks=[str(TASK_YAML)], limit=3, seq_len=24, out=run / "eval",
             num_samples=2, batch_size=4, speed_prompt_len=8, decode_tokens=2, speed_repeats=1)  # fmt: skip
    yield {"run": run, "depth": depth, "order": order, "prune": prune}
    mp.undo()


def test_run_report_has_every_section_and_is_self_contained(run_dir):
    out = build_run_report(run_dir["run"])
    assert out == run_dir["run"] / "report.html"
    page = parse(out)
    assert page.ids == ["evaluation", "importance", "search", "distill"]
    # Depth plot + importance PNGs, eval PNGs (quality, tasks, speed, distill), the regenerated distill curve.
    assert check_images(page) >= 6
    text = " ".join(page.text)
    chosen = run_dir["prune"]["chosen"]
    pattern = chosen["source"]["pattern"]
    removed = sorted(set(range(len(pattern))) - set(chosen["plan"]["layers"]))
    assert removed == sorted(run_dir["order"][:2])
    assert f"removed layers (2): {', '.join(f'{i}{pattern[i]}' for i in removed)}" in text
    assert "tiny_code_mc" in text and "perplexity" in text and "prefill tokens/s" in text
    assert f"{run_dir['prune']['candidates'][0]['params']:,}" in text  # the candidate table
    assert "intermediate_size 96 96" in " ".join(text.split())  # widths: source (from its config) vs chosen
    c = chosen["result"]["layers"]
    summary = (
        f"{len(chosen['result']['pattern'])} layers: {c['mamba']} Mamba, {c['attention']} attention, {c['mlp']} MLP"
    )
    assert summary in text and "widths.ffn" in text
    assert "3 points" in text  # the half-written last line of metrics.jsonl is skipped, not fatal


def test_report_skips_missing_stages_and_cli(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir["run"] / "eval", partial / "eval")
    code, stdout, stderr = run_cli(["report", str(partial), "-o", str(tmp_path / "page.html")])
    assert code == 0, stderr
    page = parse(tmp_path / "page.html")
    assert page.ids == ["evaluation"] and check_images(page) >= 3
    assert "not in this run: Importance, Search and chosen layout, Distillation" in " ".join(page.text)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no stage outputs"):
        build_run_report(tmp_path / "empty")
    code, _, stderr = run_cli(["report", str(tmp_path / "missing")])
    assert code == 2 and stderr.startswith("error: run folder not found")


def _chromium() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium on this machine (apt-get install chromium)")
def test_run_report_renders_in_headless_chromium(run_dir):
    out = build_run_report(run_dir["run"])
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for sid in ("evaluation", "importance", "search", "distill"):
        assert f'id="{sid}"' in dom
    assert dom.count("data:image/png;base64,") >= 6


def test_layout_section_reads_flat_prune_reports():
    from minipuzzle.evaluate.run_report import _layouts

    lay = _layouts({"source_pattern": "M-*M-", "pattern": "M-M", "kept_layers": [0, 1, 3], "intermediate_size": 8})
    assert lay["source"] == "M-*M-" and lay["chosen"] == "M-M" and lay["kept"] == [0, 1, 3]
    assert lay["widths"] == {"intermediate_size": {"chosen": 8}}
