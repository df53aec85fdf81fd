"""Deployed kNN classification vs the run's own evaluation, on the run's own split.

    python benchmarks/deploy_check.py RUN_DIR EXPORT_DIR [--index Flat] [--work DIR]

RUN_DIR is an `embedft train` run folder (its config.yaml and eval/report.json), EXPORT_DIR
the `embedft export` of its adapter. The script splits the run's data as training did
(`data.load_splits`), writes the train split (id, text, label) and the eval split as CSVs,
then does with the export what a search team does: `index_corpus` (`embedft index build
--label-column label`) over the train split, and `open_index`, `search_index` + `classify` (`embedft index
search --classify -k eval.knn_k`) with the eval texts as queries. It prints accuracy and
macro-F1 of those labels next to the adapted model's figures in eval/report.json, and the
seconds of each step. With a Flat index (exact search, as the evaluation) they should agree.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_split(path: Path, texts: list[str], labels: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows((i, t, y) for i, (t, y) in enumerate(zip(texts, labels)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--index", default="Flat", help="FAISS factory string of the deployed index")
    ap.add_argument("--work", type=Path, help="folder for the split CSVs and the index (default: a temp folder)")
    args = ap.parse_args()

    import numpy as np

    from embedft.config import load_config
    from embedft.data.examples import load_splits
    from embedft.evaluation.metrics import classification_metrics
    from embedft.search import indexing as deploy

    cfg = load_config(args.run_dir / "config.yaml")
    report = json.loads((args.run_dir / "eval" / "report.json").read_text())["adapted"]
    train, eval_, _ = load_splits(cfg.data)
    if train.labels is None:
        raise SystemExit(f"{args.run_dir}: its data has no label column, so there is no classification to deploy")
    work = args.work or Path(tempfile.mkdtemp(prefix="deploy_check-"))
    work.mkdir(parents=True, exist_ok=True)
    write_split(work / "train.csv", train.texts, train.labels)
    write_split(work / "eval.csv", eval_.texts, eval_.labels)

    t0 = time.perf_counter()
    deploy.index_corpus(args.export_dir, work / "train.csv", work / "index", factory=args.index,
                        label_column="label", overwrite=True)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = deploy.open_index(work / "index")
    hits = deploy.search_index(folder, eval_.texts, k=cfg.eval.knn_k)
    predicted = deploy.classify(hits, deploy.index_labels(folder), weighted=cfg.eval.knn_weighted)
    t_search = time.perf_counter() - t0

    classes = sorted(set(train.labels))
    names = classes + sorted(set(eval_.labels) - set(classes))  # as the evaluation numbers them
    class_id = {c: i for i, c in enumerate(names)}
    y_true = np.array([class_id[y] for y in eval_.labels])
    y_pred = np.array([class_id[y] if y is not None else -1 for y in predicted])
    deployed = classification_metrics(y_true, y_pred, names, prefix="classification/")

    result = {"run": str(args.run_dir), "export": str(args.export_dir), "index": args.index, "k": cfg.eval.knn_k,
              "train_rows": len(train), "eval_rows": len(eval_), "build_seconds": round(t_build, 1),
              "search_classify_seconds": round(t_search, 1)}
    for name in ("accuracy", "macro_f1"):
        key = f"classification/{name}"
        result[f"deployed_{name}"], result[f"evaluated_{name}"] = deployed[key], report[key]
        print(f"{name:9s} deployed {deployed[key]:.4f}   evaluated (eval/report.json) {report[key]:.4f}")
    print(f"index build {t_build:.1f} s ({len(train)} texts), search + classify {t_search:.1f} s ({len(eval_)} queries)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
