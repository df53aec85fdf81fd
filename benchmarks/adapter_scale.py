"""Validation metric of a trained adapter with its update scaled: base + alpha x (LoRA update).

    python benchmarks/adapter_scale.py runs/NAME/config.yaml runs/NAME/adapter --alphas 0.5,0.7,0.9,1,1.1

alpha 0 is the base model, 1 the adapter as trained; in between is WiSE-FT's interpolation of the base
and the tuned weights (Wortsman et al. 2022), above 1 an extrapolation. It reads the experiment's
training split and carves the validation split as training does (`train.val_fraction`,
`data.split_seed`), then prints the task's validation metric (recall@10 for grouped and pairs data, kNN
macro-F1 for labeled data) per alpha, as `train.select_best` measures it at each epoch. The test split
is never read. Nothing is trained; each alpha is one encoding of the validation texts.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="the run's config.yaml (or the experiment it trained)")
    ap.add_argument("adapter", help="the adapter folder (runs/NAME/adapter)")
    ap.add_argument("--alphas", default="0.5,0.7,0.8,0.9,1,1.1", help="comma-separated multiples of the update")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]

    from peft.tuners.lora import LoraLayer

    from embedft.config import load_config
    from embedft.modeling.encoder import load_encoder
    from embedft.modeling.lora import load_adapter
    from embedft.recipes.common import prepare_data
    from embedft.training.validation import selected_metric, val_set_for, validate

    cfg = load_config(args.experiment)
    data = prepare_data(cfg)
    encoder = load_adapter(load_encoder(cfg.model), args.adapter)
    encoder.eval()
    val = val_set_for(encoder, data.fit, data.val, cfg)
    if val is None:
        raise SystemExit(f"{args.experiment}: no validation split (train.val_fraction=0 or train.eval_every_epoch "
                         "false); there is nothing to measure alpha on")
    layers = [m for m in encoder.backbone.modules() if isinstance(m, LoraLayer)]
    scales = [dict(m.scaling) for m in layers]  # peft multiplies each layer's B A x by scaling[adapter]
    device = next(encoder.backbone.parameters()).device
    results, metric = [], selected_metric(val, cfg.train.select_metric)
    for alpha in alphas:
        for m, scale in zip(layers, scales):
            m.scaling.update({name: s * alpha for name, s in scale.items()})
        t0 = time.perf_counter()
        out = validate(encoder, val, None, None, cfg.train.batch_size, device, cfg.train.seed)
        results.append({"alpha": alpha, **out, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"alpha {alpha:g}: {metric} {out[metric]:.4f}", flush=True)
    print(json.dumps({"experiment": args.experiment, "adapter": args.adapter, "metric": metric,
                      "results": results}))


if __name__ == "__main__":
    main()
