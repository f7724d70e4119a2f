"""``python -m training pretrain|train|train-multi|evaluate|export|lungnet|lungnet-export|lungnet-evaluate``.

Examples (reduced CPU configuration)::

    python -m training train --preset cpu-small --run-dir runs/sinfnet
    python -m training train --preset cpu-small --aug --cutout 0.4 --run-dir runs/sinfnet-aug04
    python -m training pretrain --preset cpu-small --run-dir runs/pretrain
    python -m training train --preset cpu-small --init runs/pretrain/pretrained.pt --run-dir runs/selfsup
    python -m training evaluate --ckpt runs/sinfnet/best.pt
    python -m training export --ckpt runs/sinfnet/best.pt --name infnet-compact
    python -m training lungnet --out runs/lungnet                     # lung network (docs/lungs.md)
    python -m training lungnet-export --ckpt runs/lungnet/last.pt
    python -m training lungnet-evaluate --name lungnet               # its validation figures
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, RunConfig


def _cfg(args, command) -> RunConfig:
    cfg = RunConfig(command=command, preset=args.preset)
    for k, v in PRESETS[args.preset].items():
        setattr(cfg, k, v)
    if command == "pretrain":
        cfg.epochs = PRESETS[args.preset]["pretrain_epochs"]
    if command == "train" and getattr(args, "train_set", None) == "pseudo":
        cfg.epochs = PRESETS[args.preset]["pseudo_epochs"]
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k) and k not in ("command", "preset"):
            setattr(cfg, k, v)
    if args.preset == "gpu-full" and args.device is None:
        cfg.device = "cuda"
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
        sp.add_argument("--data")
        sp.add_argument("--device", choices=["cpu", "cuda"])
        sp.add_argument("--seed", type=int)
        sp.add_argument("--num-threads", dest="num_threads", type=int)
        sp.add_argument("--eval-size", dest="eval_size", type=int)
        sp.add_argument("--fold", type=int, help="validate on this grouped cross-validation fold (0-4) instead of "
                        "the fixed validation split")

    def trainargs(sp):
        common(sp)
        sp.add_argument("--run-dir", dest="run_dir", required=True)
        sp.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
        sp.add_argument("--arch")
        sp.add_argument("--size", type=int)
        sp.add_argument("--scales", type=float, nargs="+")
        sp.add_argument("--batch", type=int)
        sp.add_argument("--epochs", type=int)
        sp.add_argument("--lr", type=float)
        sp.add_argument("--aug", action="store_true", default=None, help="flips, crop, rotation")
        sp.add_argument("--cutout", type=float, help="cutout area ratio (0.2/0.4/0.5); implies --aug")
        sp.add_argument("--init", help="checkpoint to initialise from (pretrained.pt or a pseudo-stage best.pt)")
        sp.add_argument("--train-limit", dest="train_limit", type=int)
        sp.add_argument("--max-batches", dest="max_batches", type=int)
        sp.add_argument("--val-every", dest="val_every", type=int)
        sp.add_argument("--multi-base", dest="multi_base", type=int)

    sp = sub.add_parser("pretrain", help="self-supervised coach + inpainting pretraining (Algorithm 2)")
    trainargs(sp)
    sp.add_argument("--pretrain-limit", dest="pretrain_limit", type=int)
    sp.add_argument("--coach-steps", dest="coach_steps", type=int)
    sp.add_argument("--keep", type=float)
    sp.add_argument("--alpha", type=float)
    sp.add_argument("--coach-scale", dest="coach_scale", type=float,
                    help="coach scores standardised per image times this before the sigmoid (0: raw scores)")
    sp = sub.add_parser("train", help="single-class Inf-Net")
    trainargs(sp)
    sp.add_argument("--train-set", dest="train_set", choices=["doctor", "pseudo"])
    sp.add_argument("--pseudo-limit", dest="pseudo_limit", type=int)
    sp = sub.add_parser("train-multi", help="multi-class network (image + prior)")
    trainargs(sp)
    sp.add_argument("--prior-ckpt", dest="prior_ckpt",
                    help="single-class checkpoint whose binarised map (flip TTA) replaces the data set's prior")
    sp = sub.add_parser("validate", help="a single-class model on the validation split (model selection)")
    common(sp)
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--tta", action="store_true", help="average over four flips (models.tta)")
    sp = sub.add_parser("evaluate", help="evaluate a final model once on the 48 test slices")
    common(sp)
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--prior-ckpt", dest="prior_ckpt")
    sp.add_argument("--tta", action="store_true",
                    help="Inf-Net maps (and a multi-class model's prior) averaged over four flips (models.tta)")
    sp.add_argument("--out")
    sp = sub.add_parser("shipped-metrics", help="the shipped weights on the test slices as the "
                        "engine runs them; --write records them in the sidecars (infnet-compact: test_metrics_tta; "
                        "infnet-multiclass: test_metrics_with_shipped_prior[_tta])")
    sp.add_argument("--data", default=None)
    sp.add_argument("--write", action="store_true")
    sp = sub.add_parser("export", help="export a checkpoint to models/weights (fp16 safetensors + JSON)")
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--name", required=True)
    sp.add_argument("--out-dir", dest="out_dir", default="models/weights")
    sp.add_argument("--tta", choices=["none", "flips"], default="none",
                    help="test-time augmentation the node's engine applies with these weights (models.tta)")

    sp = sub.add_parser("lungnet", help="the lung network (models/lungnet.py, training/lungnet.py)")
    sp.add_argument("--data")
    sp.add_argument("--out", default="runs/lungnet")
    sp.add_argument("--epochs", type=int)
    sp.add_argument("--samples-per-epoch", dest="samples_per_epoch", type=int)
    sp.add_argument("--batch", type=int)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--seed", type=int)
    sp.add_argument("--size", type=int)
    sp.add_argument("--dataset-size", dest="dataset_size", type=int,
                    help="size of the stored examples (default 128); a finer network input needs finer examples")
    sp.add_argument("--num-threads", dest="num_threads", type=int)
    sp.add_argument("--max-batches", dest="max_batches", type=int)
    sp.add_argument("--device", choices=["cpu", "cuda"])
    sp.add_argument("--channels", type=int, nargs="+", help="U-Net channels per level")
    sp.add_argument("--init", help="start from these shipped weights (name in models/weights), e.g. lungnet")
    sp.add_argument("--real", action="store_true", default=None,
                    help="also the real-CT examples of training.real_ct (a candidate, docs/protocol.md)")
    sp.add_argument("--dense-phantoms", dest="dense_phantoms", action="store_true", default=None,
                    help="also the diseased phantoms with airless consolidation (a candidate, docs/protocol.md)")
    sp.add_argument("--dense-weight", dest="dense_weight", type=float,
                    help="cross-entropy weight of dense lung (label lung above -320 HU; default 1)")
    sp.add_argument("--dense-border", dest="dense_border", type=int,
                    help="with --dense-weight: also on dense not-lung within this many pixels of the lung label")
    sp.add_argument("--teacher", help="train against the probability of these shipped weights (distillation), "
                                      "e.g. lungnet; validation stays against the labels")
    sp.add_argument("--no-soft-dice", dest="soft_dice", action="store_false", default=None,
                    help="the cross-entropy alone, without the soft Dice term")
    sp = sub.add_parser("lungnet-export", help="export a lung network checkpoint to models/weights")
    sp.add_argument("--ckpt", required=True)
    sp.add_argument("--name", default="lungnet")
    sp.add_argument("--out-dir", dest="out_dir", default="models/weights")
    sp = sub.add_parser("lungnet-evaluate", help="validation figures of exported lung network weights, the "
                                                 "training loop's per-epoch measures")
    sp.add_argument("--name", default="lungnet")
    sp.add_argument("--weights-dir", dest="weights_dir", help="default: models/weights")
    sp.add_argument("--data")
    sp.add_argument("--out", default="runs/lungnet", help="where the examples are cached")
    sp.add_argument("--dataset-size", dest="dataset_size", type=int,
                    help="measure on examples of this size (default 128; compare networks on the same)")

    args = p.parse_args(argv)
    if args.command in ("lungnet", "lungnet-export", "lungnet-evaluate"):
        return _lungnet(args)
    from . import loops

    if args.command == "shipped-metrics":
        from models.registry import WEIGHTS_DIR

        data = args.data or RunConfig().data
        report = loops.shipped_test_metrics(data, tta=True)
        summary = {"path": "node engine (models.predict.InfNetPredictor, CPU fp32, flip TTA)", "n": report["n"],
                   "single": report["single"], "multi": report["multi"]}
        print(json.dumps(summary, indent=2))
        if args.write:
            path = WEIGHTS_DIR / "infnet-compact.json"
            meta = json.loads(path.read_text())
            meta["test_engine_path"] = summary
            path.write_text(json.dumps(meta, indent=2))
        return 0
    if args.command == "export":
        meta = loops.export(args.ckpt, args.name, args.out_dir,
                            extra_meta={"inference": {"tta": args.tta}} if args.tta != "none" else None)
        print(json.dumps({k: meta[k] for k in ("name", "arch", "sha256", "file")}, indent=2))
        return 0
    cfg = _cfg(args, args.command)
    if getattr(args, "cutout", None):
        cfg.aug = True
    if args.command == "validate":
        print(json.dumps(loops.validate(args.ckpt, cfg, tta=args.tta), indent=2))
        return 0
    if args.command == "evaluate":
        res = loops.evaluate(args.ckpt, cfg, args.out, tta=args.tta)
        print(json.dumps(res, indent=2))
        return 0
    fn = {"pretrain": loops.pretrain, "train": loops.train_single, "train-multi": loops.train_multi}[args.command]
    res = fn(cfg, resume=args.resume)
    print(json.dumps(res.get("best_val"), indent=2))
    return 0


def _lungnet(args) -> int:
    import logging

    from . import lungnet

    if args.command == "lungnet-export":
        meta = lungnet.export(args.ckpt, args.name, args.out_dir)
        print(json.dumps({k: meta[k] for k in ("name", "arch", "sha256", "file", "parameters")}, indent=2))
        return 0
    if args.command == "lungnet-evaluate":
        from models.registry import load_shipped

        given = {k: getattr(args, k) for k in ("data", "dataset_size") if getattr(args, k)}
        cfg = lungnet.LungNetConfig(out=args.out, **given)
        data = lungnet.build_dataset(cfg)
        model, meta = load_shipped(args.name, args.weights_dir)
        print(json.dumps(lungnet.evaluate(model, data, data["val"], int(meta["input"]["size"])), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = lungnet.LungNetConfig()
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k):
            setattr(cfg, k, v)
    print(json.dumps(lungnet.train(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
