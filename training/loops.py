"""Training / pretraining / evaluation / export loops. Imports only torch, numpy, pillow (+ safetensors for
export, tqdm for progress bars)."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.coach import CoachNet, coach_mask, erasure
from models.factory import build_model, model_config
from models.registry import sha256_file

from . import data as D
from .augment import AugConfig, augment
from .config import RunConfig
from .losses import coach_loss, multiclass_loss, recon_loss, seg_loss, sobel_edges
from . import evaluation as E
from .metrics import multiclass_dice

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **_):
        return x


# ----------------------------------------------------------------------------------------------- utilities
def seed_all(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class Run:
    """A run directory: config.json, log.txt, metrics.json, last.pt, best.pt."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        self.t0 = time.time()

    def log(self, msg: str):
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.1f}s] {msg}"
        with open(self.dir / "log.txt", "a") as f:
            f.write(line + "\n")
        tqdm.write(line) if hasattr(tqdm, "write") else print(line)

    def write_metrics(self, update: dict):
        p = self.dir / "metrics.json"
        m = json.loads(p.read_text()) if p.exists() else {}
        m.update(update)
        p.write_text(json.dumps(m, indent=2))
        return m


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    return torch.device(cfg.device)


def setup_threads(cfg: RunConfig):
    if cfg.num_threads and cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)


def autocast(cfg: RunConfig, dev: torch.device):
    if dev.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)  # bf16: no loss scaling needed
    return nullcontext()


def prep_model(model, dev):
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_dev(x, dev):
    x = x.to(dev, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if dev.type == "cuda" else x


def save_ckpt(path, model, arch, extra: dict):
    torch.save({"arch": arch, "model_config": model_config(model), "state_dict": model.state_dict(), **extra},
               path)


def load_ckpt(path, map_location="cpu"):
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_ckpt(path, dev="cpu"):
    ck = load_ckpt(path)
    m = build_model(ck["arch"], ck["model_config"])
    m.load_state_dict(ck["state_dict"])
    m.set_mode("segment") if hasattr(m, "set_mode") else None
    return m.to(dev).eval(), ck


def trained_size(ck: dict, default: int) -> int:
    """The input size a checkpoint was selected at (its run's eval_size): priors are predicted at it."""
    return int((ck.get("run_config") or {}).get("eval_size") or default)


def init_from(model, path, run: Run | None = None):
    """Initialise shared weights from a checkpoint (pretraining or pseudo-label stage); the segmentation heads
    are re-initialised when the source was an inpainting network."""
    ck = load_ckpt(path)
    sd = ck["state_dict"]
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    if ck.get("mode") == "inpaint" and hasattr(model, "reset_seg_heads"):
        model.reset_seg_heads()
    if run:
        run.log(f"init from {path}: {len(keep)}/{len(own)} tensors, source mode {ck.get('mode', 'segment')}")


def batches(n, bs, gen, shuffle=True):
    idx = torch.randperm(n, generator=gen).tolist() if shuffle else list(range(n))
    for i in range(0, n, bs):
        yield idx[i:i + bs]


def scaled(size, rate):
    return int(round(size * rate / 32) * 32)


# ----------------------------------------------------------------------------------------------- prediction
def engine_maps(model, images: list[np.ndarray], size: int, dev, tta: bool = False) -> list[np.ndarray]:
    """Probability maps of 8-bit slices through the node's engine path (training.evaluation)."""
    return E.predict(E.engine_predictor(model, size, dev.type, tta), images)[0]


def validation_score(model, val: D.SliceSet, size: int, dev, tta: bool = False) -> dict:
    """The selection metric on the validation slices: the toolbox's mean Dice through the engine path
    (docs/protocol.md), with Dice@0.5 beside it."""
    rows = E.single_rows(E.engine_predictor(model, size, dev.type, tta), val.images, val.masks)
    return {"mean_dice": float(np.mean([r["mean_dice"] for r in rows])),
            "dice": float(np.mean([r["dice"] for r in rows])), "n": len(rows)}


@torch.no_grad()
def predict_multi(model, images, priors, size, dev, batch=8):
    """Label maps (0 bg, 1 GGO, 2 consolidation) at native size; priors are [0, 1] float maps or uint8."""
    model.eval()
    out = []
    for i in range(0, len(images), batch):
        ims = images[i:i + batch]
        prs = priors[i:i + batch]
        x = torch.from_numpy(np.stack([D.resize_np(a, (size, size)) for a in ims]))[:, None].float() / 255
        pr = torch.from_numpy(np.stack([D.resize_np(_u8(p), (size, size)) for p in prs]))[:, None].float() / 255
        inp = to_dev(torch.cat([D.normalize(x), pr], 1), dev)
        logits = model(inp).float()
        for a, lg in zip(ims, logits):
            lg = F.interpolate(lg[None], size=a.shape, mode="bilinear", align_corners=False)
            out.append(lg.argmax(1)[0].cpu().numpy().astype(np.uint8))
    return out


def _u8(p):
    p = np.asarray(p)
    return p if p.dtype == np.uint8 else (np.clip(p, 0, 1) * 255).round().astype(np.uint8)


def eval_multi(model, images, priors, labels, size, dev) -> dict:
    """Training-time validation of the multi-class network on given priors (the data set's Semi-Inf-Net map
    or a single-class model's): checkpoint selection only; reported figures come from training.evaluation."""
    preds = predict_multi(model, images, priors, size, dev)
    rows = [multiclass_dice(p, g) for p, g in zip(preds, labels)]
    losses = []
    for im, pr, g in zip(images, priors, labels):
        x = torch.from_numpy(D.resize_np(im, (size, size)))[None, None].float() / 255
        q = torch.from_numpy(D.resize_np(_u8(pr), (size, size)))[None, None].float() / 255
        lab = torch.from_numpy(D.resize_np(g, (size, size), True))[None, None].float()
        with torch.no_grad():
            lg = model(to_dev(torch.cat([D.normalize(x), q], 1), dev)).float().cpu()
        losses.append(float(multiclass_loss(lg, lab)))
    # dataset-level Dice as well (pooled over slices; slices without a class count as 1.0 in the mean)
    tp = {c: 0 for c in (1, 2)}
    den = {c: 0 for c in (1, 2)}
    for p, g in zip(preds, labels):
        for c in (1, 2):
            tp[c] += int(((p == c) & (g == c)).sum())
            den[c] += int((p == c).sum() + (g == c).sum())
    return {
        "dice_ggo": float(np.mean([r[1] for r in rows])),
        "dice_consolidation": float(np.mean([r[2] for r in rows])),
        "pooled_dice_ggo": 2 * tp[1] / max(den[1], 1),
        "pooled_dice_consolidation": 2 * tp[2] / max(den[2], 1),
        "loss": float(np.mean(losses)),
        "n": len(rows),
    }


# ----------------------------------------------------------------------------------------------- training
def _optim(model, cfg):
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _sched(opt, epochs):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=1e-5)


def _resume(run: Run, model, opt, sched, scaler, gen):
    p = run.dir / "last.pt"
    if not p.exists():
        return 0, None, []
    ck = load_ckpt(p)
    model.load_state_dict(ck["state_dict"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    gen.set_state(ck["gen_state"])
    torch.set_rng_state(ck["torch_rng"])
    run.log(f"resumed from {p} at epoch {ck['epoch'] + 1}")
    return ck["epoch"] + 1, ck.get("best"), ck.get("history", [])


def train_single(cfg: RunConfig, resume=False) -> dict:
    """Supervised Inf-Net training on the doctor-labelled (or pseudo-labelled) slices; model selection on the
    fixed validation split of the 50 doctor-labelled slices."""
    setup_threads(cfg)
    gen = seed_all(cfg.seed)
    dev = device_of(cfg)
    run = Run(cfg)
    doctor = D.load_split("doctor", cfg.data)
    tr_idx, va_idx = D.labelled_split(doctor, cfg.n_val, cfg.split_seed, cfg.fold)
    val = doctor.subset(va_idx)
    if cfg.train_set == "pseudo":
        train = D.load_split("pseudo", cfg.data, limit=cfg.pseudo_limit, seed=cfg.split_seed)
    else:
        train = doctor.subset(tr_idx)
    if cfg.train_limit:
        train = train.subset(list(range(min(cfg.train_limit, len(train)))))
    base = scaled(cfg.size, max(cfg.scales))
    tensors = D.stack(train, base)
    if dev.type == "cuda":  # decoded once, kept on the GPU: augmentation runs there too
        tensors = {k: v.to(dev) for k, v in tensors.items()}
    run.log(f"data: train {cfg.train_set} {len(train)} slices (stacked at {base}px), val {len(val)} slices")
    model = prep_model(build_model(cfg.arch), dev)
    if cfg.init:
        init_from(model, cfg.init, run)
    opt = _optim(model, cfg)
    sched = _sched(opt, cfg.epochs)
    scaler = None  # bf16 autocast on CUDA needs no GradScaler
    aug = AugConfig(enabled=cfg.aug, cutout=cfg.cutout)
    start, best, history = (0, None, [])
    if resume:
        start, best, history = _resume(run, model, opt, sched, scaler, gen)
    for ep in range(start, cfg.epochs):
        model.train()
        tl, nb = 0.0, 0
        for bi, idx in enumerate(tqdm(list(batches(len(train), cfg.batch, gen)), desc=f"epoch {ep + 1}/{cfg.epochs}",
                                      leave=False, disable=None)):
            if cfg.max_batches and bi >= cfg.max_batches:
                break
            b = {k: v[idx] for k, v in tensors.items()}
            for rate in cfg.scales:
                s = scaled(cfg.size, rate)
                a = augment(b, s, aug, gen)
                x = to_dev(D.normalize(a["image"]), dev)
                mask, edge = a["mask"].to(dev), a["edge"].to(dev) if "edge" in a else None
                with autocast(cfg, dev):
                    out = model(x)
                loss = seg_loss([o.float() for o in out], mask, edge, cfg.lam)
                opt.zero_grad(set_to_none=True)
                if scaler:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip)  # Inf-Net clip_gradient
                (scaler.step(opt), scaler.update()) if scaler else opt.step()
                tl += loss.item()
                nb += 1
        sched.step()
        rec = {"epoch": ep + 1, "train_loss": tl / max(nb, 1)}
        if (ep + 1) % cfg.val_every == 0 or ep + 1 == cfg.epochs:
            v = validation_score(model, val, cfg.eval_size, dev)
            rec.update({f"val_{k}": v[k] for k in ("dice", "mean_dice")})
            if best is None or v["mean_dice"] > best["val_mean_dice"]:
                best = {"epoch": ep + 1, "val_mean_dice": v["mean_dice"], "val_dice": v["dice"]}
                save_ckpt(run.dir / "best.pt", model, cfg.arch, {"mode": "segment", "epoch": ep + 1, "val": v,
                                                                 "run_config": cfg.to_dict()})
        history.append(rec)
        run.log(json.dumps(rec))
        save_ckpt(run.dir / "last.pt", model, cfg.arch, {
            "mode": "segment", "epoch": ep, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler else None, "gen_state": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "best": best, "history": history, "run_config": cfg.to_dict()})
    m = run.write_metrics({"best_val": best, "history": history, "wall_s_this_session": time.time() - run.t0,
                           "device": str(dev), "torch": torch.__version__})
    run.log(f"done; best val {best}")
    return m


def _random_blob_mask(n, size, keep, gen, dev):
    b = torch.rand(n, 1, max(2, size // 16), max(2, size // 16), generator=gen)
    b = F.interpolate(b, size=(size, size), mode="bilinear", align_corners=False).to(dev)
    return coach_mask(b, keep, alpha=50.0)


def pretrain(cfg: RunConfig, resume=False) -> dict:
    """Self-supervised pretraining, Fung et al. Algorithm 2: every epoch the coach is trained for
    ``coach_steps`` batches against the frozen inpainter (L_coach = 1 - L_rec(x * M)), then the inpainting
    network is trained on the coach's masks (frozen coach) for one pass over the unlabelled images. Epoch 1
    uses random blob masks of the same erased fraction (the coach is untrained). Images: the 40 training
    slices + a subset of the pseudo-label images (their labels are not used); never validation or test."""
    setup_threads(cfg)
    gen = seed_all(cfg.seed)
    dev = device_of(cfg)
    run = Run(cfg)
    doctor = D.load_split("doctor", cfg.data)
    tr_idx, _ = D.labelled_split(doctor, cfg.n_val, cfg.split_seed, cfg.fold)
    imgs = [doctor.images[i] for i in tr_idx]
    if cfg.pretrain_limit is None or cfg.pretrain_limit > len(imgs):
        extra = None if cfg.pretrain_limit is None else cfg.pretrain_limit - len(imgs)
        imgs += D.load_split("pseudo", cfg.data, limit=extra, seed=cfg.split_seed).images
    if cfg.train_limit:
        imgs = imgs[:cfg.train_limit]
    base = scaled(cfg.size, max(cfg.scales))
    X = torch.from_numpy(np.stack([D.resize_np(a, (base, base)) for a in imgs]))[:, None].float() / 255
    if dev.type == "cuda":
        X = X.to(dev)
    run.log(f"pretrain data: {len(imgs)} unlabelled slices at {base}px")
    multi = cfg.arch == "multiclass-unet"
    model = prep_model(build_model(cfg.arch, {"base": cfg.multi_base} if multi else None), dev).set_mode("inpaint")
    coach = prep_model(CoachNet(keep=cfg.keep, alpha=cfg.alpha, score_scale=cfg.coach_scale or None), dev)
    opt_m = _optim(model, cfg)
    opt_c = torch.optim.Adam(coach.parameters(), lr=cfg.lr)
    aug = AugConfig(enabled=True, cutout=0.0)
    history = []
    start = 0
    last = run.dir / "last.pt"
    if resume and last.exists():
        ck = load_ckpt(last)
        model.load_state_dict(ck["state_dict"])
        coach.load_state_dict(ck["coach"])
        opt_m.load_state_dict(ck["optimizer"])
        opt_c.load_state_dict(ck["coach_optimizer"])
        gen.set_state(ck["gen_state"])
        start, history = ck["epoch"] + 1, ck["history"]
        run.log(f"resumed at epoch {start + 1}")

    def rec_of(xb, m_keep):
        inp = D.normalize(xb * m_keep)
        if multi:
            inp = torch.cat([inp, torch.zeros_like(inp)], 1)  # no prior during pretraining
            out = model(inp)
            return recon_loss(out, xb, m_keep)
        return recon_loss(model(inp), xb, m_keep, sobel_edges(xb))

    for ep in range(start, cfg.epochs):
        s = scaled(cfg.size, 1.0)
        # (a) coach steps, inpainter frozen
        cl = []
        if ep > 0:
            model.eval()
            coach.train()
            for bi, idx in enumerate(batches(len(X), cfg.batch, gen)):
                if bi >= cfg.coach_steps:
                    break
                xb = to_dev(augment({"image": X[idx]}, s, aug, gen)["image"], dev)
                m_keep = coach(D.normalize(xb))
                loss = coach_loss(rec_of(xb, m_keep))
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                cl.append(loss.item())
        # (b) inpainting-network steps, coach frozen
        model.train()
        coach.eval()
        ml, shares = [], []
        for bi, idx in enumerate(tqdm(list(batches(len(X), cfg.batch, gen)), desc=f"pretrain {ep + 1}/{cfg.epochs}",
                                      leave=False, disable=None)):
            if cfg.max_batches and bi >= cfg.max_batches:
                break
            xb = to_dev(augment({"image": X[idx]}, s, aug, gen)["image"], dev)
            with torch.no_grad():
                m_keep = coach(D.normalize(xb)) if ep > 0 else _random_blob_mask(len(idx), s, cfg.keep, gen, dev)
            shares.append(erasure(m_keep))
            loss = rec_of(xb, m_keep)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip)
            opt_m.step()
            ml.append(loss.item())
        rec = {"epoch": ep + 1, "rec_loss": float(np.mean(ml)), "coach_loss": float(np.mean(cl)) if cl else None,
               "mask": "random blobs" if ep == 0 else "coach", "requested_erased": round(1 - cfg.keep, 3),
               **{f"share_{k}": float(np.mean([x[k] for x in shares])) for k in ("erased", "kept")}}
        history.append(rec)
        run.log(json.dumps(rec))
        save_ckpt(last, model, cfg.arch, {"mode": "inpaint", "epoch": ep, "coach": coach.state_dict(),
                                           "optimizer": opt_m.state_dict(), "coach_optimizer": opt_c.state_dict(),
                                           "gen_state": gen.get_state(), "history": history,
                                           "run_config": cfg.to_dict()})
    save_ckpt(run.dir / "pretrained.pt", model, cfg.arch, {"mode": "inpaint", "coach": coach.state_dict(),
                                                            "history": history, "run_config": cfg.to_dict()})
    return run.write_metrics({"history": history, "wall_s_this_session": time.time() - run.t0, "device": str(dev)})


def train_multi(cfg: RunConfig, resume=False) -> dict:
    """Multi-class network on [image, prior] from MultiClassInfection-Train (same 50 slices; the same fixed
    validation split as the single-class runs). The prior is the data set's Semi-Inf-Net map, or with
    ``cfg.prior_ckpt`` that single-class model's binarised map at its own size, with flip TTA (as the engine
    makes it)."""
    setup_threads(cfg)
    gen = seed_all(cfg.seed)
    dev = device_of(cfg)
    run = Run(cfg)
    ms = D.load_split("multi-train", cfg.data)
    if cfg.prior_ckpt:
        # The prior the node's engine gives (a single-class model's binarised map, with flip TTA) instead of
        # the data set's Semi-Inf-Net prior, so training and validation see what inference will.
        prior_model, prior_ck = model_from_ckpt(cfg.prior_ckpt, dev)
        maps = engine_maps(prior_model, ms.images, trained_size(prior_ck, cfg.eval_size), dev, tta=True)
        ms = dataclasses.replace(ms, priors=[((p >= 0.5) * 255).astype(np.uint8) for p in maps])  # not the cache
        run.log(f"priors: {cfg.prior_ckpt} (binarised at 0.5, flip TTA)")
    tr_idx, va_idx = D.labelled_split(ms, cfg.n_val, cfg.split_seed, cfg.fold)
    train, val = ms.subset(tr_idx), ms.subset(va_idx)
    if cfg.train_limit:
        train = train.subset(list(range(min(cfg.train_limit, len(train)))))
    base = scaled(cfg.size, max(cfg.scales))
    T = D.stack(train, base)
    if dev.type == "cuda":
        T = {k: v.to(dev) for k, v in T.items()}
    model = prep_model(build_model("multiclass-unet", {"base": cfg.multi_base}), dev)
    if cfg.init:
        init_from(model, cfg.init, run)
    opt = _optim(model, cfg)
    sched = _sched(opt, cfg.epochs)
    aug = AugConfig(enabled=cfg.aug, cutout=cfg.cutout)
    start, best, history = 0, None, []
    if resume:
        start, best, history = _resume(run, model, opt, sched, None, gen)
    for ep in range(start, cfg.epochs):
        model.train()
        tl, nb = 0.0, 0
        for bi, idx in enumerate(batches(len(train), cfg.batch, gen)):
            if cfg.max_batches and bi >= cfg.max_batches:
                break
            b = {k: v[idx] for k, v in T.items()}
            for rate in cfg.scales:
                a = augment(b, scaled(cfg.size, rate), aug, gen)
                x = to_dev(torch.cat([D.normalize(a["image"]), a["prior"]], 1), dev)
                with autocast(cfg, dev):
                    lg = model(x)
                loss = multiclass_loss(lg.float(), a["label"].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.clip)
                opt.step()
                tl += loss.item()
                nb += 1
        sched.step()
        rec = {"epoch": ep + 1, "train_loss": tl / max(nb, 1)}
        if (ep + 1) % cfg.val_every == 0 or ep + 1 == cfg.epochs:
            v = eval_multi(model, val.images, val.priors, val.masks, cfg.eval_size, dev)
            rec.update({"val_loss": v["loss"], "val_dice_ggo": v["dice_ggo"], "val_dice_cons": v["dice_consolidation"]})
            score = v["dice_ggo"] + v["dice_consolidation"]
            if best is None or score > best["val_score"]:
                best = {"epoch": ep + 1, "val_score": score, **{f"val_{k}": x for k, x in v.items()}}
                save_ckpt(run.dir / "best.pt", model, "multiclass-unet", {"mode": "segment", "epoch": ep + 1,
                                                                         "run_config": cfg.to_dict()})
        history.append(rec)
        run.log(json.dumps(rec))
        save_ckpt(run.dir / "last.pt", model, "multiclass-unet", {
            "mode": "segment", "epoch": ep, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "gen_state": gen.get_state(), "torch_rng": torch.get_rng_state(), "best": best, "history": history})
    return run.write_metrics({"best_val": best, "history": history, "wall_s_this_session": time.time() - run.t0,
                              "device": str(dev)})


# ----------------------------------------------------------------------------------------------- evaluation
def validate(ckpt: str, cfg: RunConfig, tta: bool = False) -> dict:
    """A single-class model on the validation slices (the fixed grouped split, or ``cfg.fold``): what
    selection uses; the test set is not touched."""
    setup_threads(cfg)
    dev = device_of(cfg)
    model, _ = model_from_ckpt(ckpt, dev)
    doctor = D.load_split("doctor", cfg.data)
    _, va_idx = D.labelled_split(doctor, cfg.n_val, cfg.split_seed, cfg.fold)
    res = validation_score(model, doctor.subset(va_idx), cfg.eval_size, dev, tta=tta)
    res.update({"ckpt": ckpt, "eval_size": cfg.eval_size, "fold": cfg.fold, "tta": "flips" if tta else "none"})
    return res


SINGLE_KEYS = ["mean_dice", "mean_sen", "mean_spec", "s_alpha", "mean_e_phi", "mae", "dice", "pooled_dice_infection"]
MULTI_KEYS = ["mean_dice_ggo", "mean_dice_consolidation", "pooled_dice_ggo", "pooled_dice_consolidation"]


def test_report(predictor, data: str, multi: bool) -> dict:
    """The 48 test slices through ``predictor`` (the engine's path): per-slice rows and each figure with its
    slice-bootstrap 95 % interval; with ``multi``, the multi-class test slices as well."""
    ts = D.load_split("test", data)
    rows = E.single_rows(predictor, ts.images, ts.masks)
    out = {"n": len(rows), "single": E.summarise(rows, SINGLE_KEYS), "single_rows": rows}
    if multi:
        mt = D.load_split("multi-test", data)
        mrows = E.multi_rows(predictor, mt.images, mt.masks)
        out.update({"multi": E.summarise(mrows, MULTI_KEYS), "multi_rows": mrows})
    return out


def evaluate(ckpt: str, cfg: RunConfig, out: str | None = None, tta: bool = False) -> dict:
    """Evaluate a final model ONCE on the test slices through the engine's path: a single-class checkpoint
    alone, or a multi-class checkpoint with its single-class model as ``cfg.prior_ckpt``, both networks as the
    engine runs them (GGO = infection minus consolidation)."""
    setup_threads(cfg)
    dev = device_of(cfg)
    t0 = time.time()
    model, ck = model_from_ckpt(ckpt, dev)
    if ck["arch"] == "multiclass-unet":
        if not cfg.prior_ckpt:
            raise SystemExit("multi-class evaluation needs --prior-ckpt (single-class model giving the prior)")
        single, single_ck = model_from_ckpt(cfg.prior_ckpt, dev)
        predictor = E.engine_predictor(single, trained_size(single_ck, cfg.eval_size), dev.type, tta,
                                       multi=model, multi_size=trained_size(ck, cfg.eval_size))
        res = test_report(predictor, cfg.data, multi=True)
        res["prior_ckpt"] = cfg.prior_ckpt
    else:
        predictor = E.engine_predictor(model, trained_size(ck, cfg.eval_size), dev.type, tta)
        res = test_report(predictor, cfg.data, multi=False)
    res.update({"ckpt": ckpt, "tta": "flips" if tta else "none", "wall_s": time.time() - t0, "device": str(dev),
                "path": "engine (models.predict.InfNetPredictor.predict_crops)"})
    outp = Path(out) if out else Path(ckpt).parent / "test_metrics.json"
    outp.write_text(json.dumps(res, indent=2))
    return res


def shipped_test_metrics(data: str, tta: bool, weights_dir=None) -> dict:
    """The shipped fp16 files on the test slices as the node's engine runs them (CPU, fp32)."""
    from models.predict import InfNetPredictor

    predictor = InfNetPredictor(weights_dir=weights_dir, device="cpu", tta=tta)
    return test_report(predictor, data, multi=True)


# ----------------------------------------------------------------------------------------------- export
def export(ckpt: str, name: str, out_dir: str = "models/weights", extra_meta: dict | None = None) -> dict:
    """fp16 safetensors (segmentation weights only) + sidecar JSON with architecture, config and sha256."""
    from safetensors.torch import save_file

    ck = load_ckpt(ckpt)
    sd = {k: v.detach().cpu() for k, v in ck["state_dict"].items() if not k.startswith("inp_")}
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"{name}.safetensors"
    save_file(sd, str(st))
    os.chmod(st, 0o644)
    run_dir = Path(ckpt).parent
    metrics = {}
    for fn in ("metrics.json", "test_metrics.json"):
        p = run_dir / fn
        if p.exists():
            m = json.loads(p.read_text())
            m.pop("history", None)
            metrics[fn.replace(".json", "")] = m
    meta = {
        "name": name,
        "arch": ck["arch"],
        "model_config": ck["model_config"],
        "dtype": "float16",
        "sha256": sha256_file(st),
        "file": st.name,
        "input": {"channels": "grey CT slice, lung window, 8-bit scaled to [0,1], normalised (x-0.5)/0.25"
                  + ("; channel 2 = single-class infection prior in [0,1]" if ck["arch"] == "multiclass-unet" else ""),
                  "size": (ck.get("run_config") or {}).get("eval_size", 352), "mean": D.IMG_MEAN, "std": D.IMG_STD},
        "output": "logits; Inf-Net: (S_g, S_5, S_4, S_3, edge), S_3 is the final map" if ck["arch"] != "multiclass-unet"
        else "logits (background, GGO, consolidation)",
        "source_checkpoint": str(ckpt),
        "run_config": ck.get("run_config"),
        "metrics": metrics,
        "licence": "weights trained on COVID-SemiSeg (Inf-Net): non-commercial use only",
    }
    meta.update(extra_meta or {})
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2))
    return meta
