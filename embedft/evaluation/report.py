"""The evaluation report: base vs adapted side by side, as a table, report.json and report.md."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from embedft.atomic import building, replace_dir, write_text
from embedft.errors import EvalError
from embedft.evaluation.tasks import EvalOutput

log = logging.getLogger(__name__)


def compare(base: dict[str, float] | None,
            adapted: dict[str, float] | None) -> list[tuple[str, float | None, float | None, float | None]]:
    """Rows (metric, base, adapted, delta) for the quality figures (timings left out); either side
    may be missing (a base-only evaluation has no adapted column)."""
    rows = []
    for k in (adapted if adapted is not None else base or {}):
        if k.endswith(("/seconds", "/qps", "/build_s", "n_queries", "unseen_label_queries")):
            continue
        b = None if base is None else base.get(k)
        a = None if adapted is None else adapted.get(k)
        rows.append((k, b, a, None if a is None or b is None else a - b))
    return rows


def format_table(rows, markdown: bool = False) -> str:
    """A plain-text (or Markdown) table of compare() rows."""
    head = ("metric", "base", "adapted", "delta")
    body = [(m, "" if b is None else f"{b:.4f}", "" if a is None else f"{a:.4f}", "" if d is None else f"{d:+.4f}")
            for m, b, a, d in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in body])


def quantization_meta(quantization: str | None) -> dict[str, str]:
    """The report's words on train.base_quantization (nothing when the base trained unquantised)."""
    if not quantization:
        return {}
    return {"base_quantization": quantization,
            "base_quantization_note": f"trained on the base quantised to {quantization} by bitsandbytes (QLoRA); "
                                      "evaluated and exported on the unquantised base"}


REPORT_FILES = ("report.json", "report.md")


def check_report_dir(out: Path, option: str = "--out") -> None:
    """Refuse a report folder whose replacement would lose something: a file, or a folder holding
    more than an earlier report (`eval --out .` would otherwise replace the working directory).
    `option` names where the folder came from (--out, eval.output_dir) in the message."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"{option} {out} is a file; pass a folder for the report")
    other = sorted(p.name for p in out.iterdir() if p.name not in REPORT_FILES) if out.is_dir() else []
    if other:
        shown = ", ".join(other[:5]) + (f" ... ({len(other)} entries)" if len(other) > 5 else "")
        raise EvalError(f"{option} {out} holds files that are not an embedft report ({shown}), which writing the report "
                        "there would delete; pass a new or empty folder (an earlier report folder is replaced)")


def write_report(out_dir: str | Path, base: EvalOutput | None, adapted: EvalOutput | None, meta: dict[str, Any]) -> Path:
    """report.json + report.md, written to a temp folder and moved into place (never half-written).
    An existing `out_dir` is replaced: `check_report_dir` first where it was not made by embedft."""
    out = Path(out_dir)
    rows = compare(base.metrics if base else None, adapted.metrics if adapted else None)
    payload = {"meta": meta, "base": base.metrics if base else None, "adapted": adapted.metrics if adapted else None,
               "base_details": base.details if base else None, "adapted_details": adapted.details if adapted else None}
    report_json = json.dumps(payload, indent=2, default=_json_default)
    md = [f"# Evaluation: {meta.get('name', '')}", "", f"- model: `{meta.get('model')}`",
          f"- adapter: `{meta.get('adapter')}`", f"- eval data: `{meta.get('eval_data')}`",
          *([f"- base: {meta['base_quantization_note']}"] if meta.get("base_quantization_note") else []), "",
          format_table(rows, markdown=True), ""]
    md += [f"Not evaluated: {task}, which {why}." for task, why in (meta.get("dropped_tasks") or {}).items()]
    with building(out, "write the report elsewhere with --out", "the earlier report, if any, is kept") as tmp:
        write_text(tmp / "report.json", report_json)
        write_text(tmp / "report.md", "\n".join(md))
        replace_dir(tmp, out)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o))
