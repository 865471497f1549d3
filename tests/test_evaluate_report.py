"""`minipuzzle report RUN_DIR`: one self-contained HTML page built from a run folder whose artifacts the real
stages write (score -> prune -> distill -> eval on a tiny model), validated as HTML and, where Chromium is
installed, rendered in a headless browser."""

import base64
import io
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_evaluate import TASK_YAML

from minipuzzle.artifacts import PruneReport
from minipuzzle.distill.loop import distill
from minipuzzle.errors import UserError
from minipuzzle.evaluate.runner import evaluate
from minipuzzle.prune.stage import PruneSettings, prune
from minipuzzle.report.page import build_run_report
from minipuzzle.score.folder import score_to_folder
from minipuzzle.settings import DistillSettings, EvalSettings, ScoreSettings
from minipuzzle.testing import random_model, run_cli, save_model, tiny_layout

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


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, tokenizer, text_file):
    """A whole run made by the real stages on a tiny model, laid out as `minipuzzle run` lays it out: score/
    (drop-one layer scores), prune/ (depth candidates ranked on held-out KL, the winner cut), distill/ (a few
    real distillation steps from the cut) and eval/ (a real evaluation report of the distilled student)."""
    import datasets

    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    mp.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("ds")), raising=False)
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    source = tiny_layout()
    tpath = save_model(random_model(source, seed=5), run / "source", tokenizer=tokenizer)
    score_to_folder(tpath, str(text_file), run / "score", ScoreSettings(depth_samples=2, seq_len=24), axes=["depth"],
                    progress=False)  # fmt: skip
    settings = PruneSettings(target=str(int(source.num_params() * 0.8)), axes=("depth",), candidates=3,
                             seq_len=24, held_out_windows=2)  # fmt: skip
    prune(str(tpath), run / "prune", settings, str(text_file), scores_dir=str(run / "score"), progress=False)
    distill(DistillSettings(teacher=str(tpath), student=str(run / "prune"), data=str(text_file),
                          output=str(run / "distill"), max_steps=3, seq_len=24, batch_size=2, lr=3e-3, warmup=1,
                          eval_every=3, held_out_windows=2, save_every=0, progress=False))  # fmt: skip
    settings = EvalSettings(tasks=[str(TASK_YAML)], limit=3, seq_len=24, held_out_windows=2, batch_size=4, speed_len=8,
                            decode_tokens=2, speed_repeats=1)  # fmt: skip
    evaluate(run / "distill", run / "eval", settings, teacher_path=tpath, data=text_file)
    metrics = run / "distill" / "metrics.jsonl"
    points = len(metrics.read_text().splitlines())
    metrics.write_text(metrics.read_text() + '{"type": "train", "step": 4, "lo')  # a line cut by a killed run
    yield {"run": run, "prune": PruneReport.read(run / "prune" / "prune_report.json"), "points": points}
    mp.undo()


def test_run_report_has_every_section_and_is_self_contained(run_dir):
    out = build_run_report(run_dir["run"])
    assert out == run_dir["run"] / "report.html"
    page = parse(out)
    assert page.ids == ["evaluation", "score", "prune", "distill"]
    # Depth plot + importance PNGs, eval PNGs (quality, tasks, speed, distill), the regenerated distill curve.
    assert check_images(page) >= 6
    text = " ".join(page.text)
    chosen = run_dir["prune"].chosen
    pattern = chosen.source.pattern
    removed = sorted(set(range(len(pattern))) - set(chosen.kept_layers))
    assert len(removed) == len(pattern) - len(chosen.result.pattern) > 0
    assert f"removed layers ({len(removed)}): {', '.join(f'{i}{pattern[i]}' for i in removed)}" in text
    assert "tiny_code_mc" in text and "perplexity" in text and "prefill tokens/s" in text
    assert f"{run_dir['prune'].candidates[0].params:,}" in text  # the candidate table
    assert "measured vs predicted rank" in text and "best predicted" in text
    assert "ffn 96 96" in " ".join(text.split())  # widths: source vs chosen (depth pruning keeps them)
    c = chosen.result.layers
    summary = f"{len(chosen.result.pattern)} layers: {c['mamba']} Mamba, {c['attention']} attention, {c['mlp']} MLP"
    assert summary in text and "widths.ffn" in text
    assert f"{run_dir['points']} points" in text  # the half-written last line of metrics.jsonl is skipped, not fatal


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
    for sid in ("evaluation", "score", "prune", "distill"):
        assert f'id="{sid}"' in dom
    assert dom.count("data:image/png;base64,") >= 6
