"""The run page's quantization table: teacher, bf16 student and quantized student side by side."""

from __future__ import annotations

import json
from pathlib import Path

from minipuzzle.artifacts import EvalReport
from minipuzzle.evaluate.tables import Table, fmt


def quantized_table(run_dir: Path, bf16: EvalReport) -> Table | None:
    """Rows of held-out quality and weight bytes for the teacher, the final bf16 student (`bf16`, RUN_DIR/eval)
    and the quantized student (RUN_DIR/eval_quantized, RUN_DIR/quantize/quantize.json: the same windows); None
    when the run has no quantized evaluation."""
    f, summary = run_dir / "eval_quantized" / "report.json", run_dir / "quantize" / "quantize.json"
    if not f.is_file():
        return None
    q = EvalReport.model_validate_json(f.read_text())
    doc = json.loads(summary.read_text()) if summary.is_file() else {}
    t = bf16.teacher_quality
    keys = [("KL(teacher ‖ model) per token", "kl_to_teacher", 0.0),
            ("agreement with teacher's greedy token", "agreement", 1.0),
            ("perplexity", "perplexity", t.perplexity if t else None),
            ("next-token accuracy", "accuracy", t.accuracy if t else None)]  # fmt: skip
    rows = [[label, fmt(teacher), fmt(getattr(bf16, k)), fmt(getattr(q, k))] for label, k, teacher in keys]
    if doc:
        b = doc["bytes"]
        rows.append(["weight bytes (checkpoint)", "–", fmt(2 * doc["params"]),
                     f"{fmt(b['total'])} ({fmt(b['quantized_params'])} parameters quantized)"])  # fmt: skip
    name = doc.get("precision", "quantized").upper()
    return ["metric", "teacher", "student (bf16)", f"student ({name}, simulated)"], rows
