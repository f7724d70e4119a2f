"""Training data, loop and export of the lung network (models/lungnet.py); protocol in docs/lungs.md.

Labels (no lung masks exist for the data at hand; they are built so):

* COVID-SemiSeg training slices (the 50 doctor-labelled and every ``PSEUDO_EVERY``-th of the 1600
  pseudo-labelled ones; never the 48 test slices): each crop is made into a padded HU slice
  (training.semiseg_ct); lung = the node's aerated lung (``segment_lungs(method="aerated")``: HU steps without
  dense recovery) united with the slice's infection mask (expert or pseudo label; infection is lung by
  definition), holes filled.
* phantoms (node.phantom.make_phantom, ``PHANTOMS``): their true lungs; consolidation against the wall, the
  heart and the diaphragm; dependent effusion (not lung) in some.
* with ``--real`` (a candidate, docs/protocol.md "Lung network", not the shipped network): real CT without
  dense disease (training.real_ct: an abdomen series at the lung bases and a chest crop around the heart, none
  of the slices the lung step is judged on): the HU method's aerated lung, holes filled; real chest walls,
  mediastinum and axillae, which are not lung.
* with ``--dense-phantoms`` (a candidate): the diseased training phantoms once more with airless consolidation
  (node.phantom.DENSE_CONSOLIDATION_HU, soft-tissue density up to contrast enhancement), which the node's
  network otherwise gives low probability.

Every example is the body box of its slice (volume-wide box for the phantoms, as the node crops), resized to
the network size. Validation (reported every epoch, no selection: the last epoch is exported): the 10
doctor-labelled slices of ``training.data.labelled_split`` and the phantom ``VAL_PHANTOM``, never trained on;
reported apart, ``VAL_PHANTOM`` with airless consolidation ("phantom_dense").
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from models.lungnet import DEFAULT_SIZE, LUNG_WINDOW, SOFT_WINDOW, LungNet, lung_input
from node.pipeline.lungs.density import AIR_HU  # lung above it is dense lung (consolidation, vessels)

from .paths import semiseg_root

DATASET_SIZE = 128         # examples are stored at this size (``dataset_size``); the network input (``size``) may
                           # differ: its logits are resized to the example for the loss, as the node resizes them
                           # to the slice. A network with a finer input needs examples at least as fine.

log = logging.getLogger(__name__)

OUTSIDE_AIR_MEDIAN_HU = -950.0  # aerated lung reads about -850; the crops' outside air at the window floor, -1050
PSEUDO_EVERY = 4           # 400 of the 1600 pseudo-labelled slices
DOCTOR_REPEAT = 4          # the expert-labelled training slices count this many times per epoch
SOURCE_DOCTOR, SOURCE_PSEUDO, SOURCE_PHANTOM, SOURCE_REAL, SOURCE_PHANTOM_DENSE = 0, 1, 2, 3, 4
DATASET_VERSION = 2        # in the cache name: version 2 added the validation phantom with airless consolidation
REAL_REPEAT = 2            # the real slices count this many times per epoch
# (seed, burden, effusion); 40 slices of 128 x 128 at 2.6-3.2 mm, 7.5 mm apart
PHANTOMS: list[tuple[int, float | dict[str, float], float]] = [
    (10, {"right_lower": 0.9, "left_lower": 0.9}, 0.0),
    (11, {"right_lower": 0.8, "right_middle": 0.6}, 0.15),
    (12, {"left_lower": 0.9, "left_upper": 0.5}, 0.0),
    (13, 0.5, 0.2),
    (14, 0.0, 0.25),
    (15, {"right_upper": 0.8, "left_lower": 0.7}, 0.1),
    (16, 0.3, 0.0),
    (17, {"right_lower": 1.0, "left_lower": 1.0, "right_middle": 0.8}, 0.15),
]
VAL_PHANTOM = (18, {"right_lower": 0.9, "left_lower": 0.6}, 0.15)


@dataclass
class LungNetConfig:
    data: str = field(default_factory=lambda: str(semiseg_root()))  # $CTNODE_DATA, else ../shared/data
    out: str = "runs/lungnet"
    size: int = DEFAULT_SIZE        # network input
    dataset_size: int = DATASET_SIZE  # size of the stored examples (and of the validation measures)
    channels: list[int] = field(default_factory=lambda: [8, 16, 32, 48, 64])
    epochs: int = 6
    samples_per_epoch: int = 480  # drawn with replacement, doctor-labelled slices weighted DOCTOR_REPEAT
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    num_threads: int = 2
    max_batches: int | None = None  # per epoch (smoke runs)
    device: str = "cpu"
    real: bool = False             # also the real-CT source (training.real_ct); not in the shipped network
    init: str | None = None        # start from these shipped weights (models/weights/<init>), not at random
    dense_phantoms: bool = False   # also the diseased phantoms with airless consolidation; not in the shipped network
    dense_weight: float = 1.0      # weight of dense lung (label lung above AIR_HU) in the cross-entropy
    dense_border: int = 0          # ... and of dense not-lung within this many pixels of the lung label (0: none)
    teacher: str | None = None     # train against this shipped network's probability (distillation), not the labels
    soft_dice: bool = True         # the soft Dice term of the loss (the cross-entropy alone without it)


# --------------------------------------------------------------------------------------------- data


def _box(hu: np.ndarray, label: np.ndarray, body: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, r, c) HU and label cut to the body box and resized to size x size as the network input is."""
    from node.pipeline.lungs.body import body_box

    rows, cols = body_box(body)
    x = torch.from_numpy(np.ascontiguousarray(hu[:, rows, cols], dtype=np.float32))[:, None]
    y = torch.from_numpy(np.ascontiguousarray(label[:, rows, cols], dtype=np.float32))[:, None]
    resize = dict(size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, **resize)[:, 0], F.interpolate(y, **resize)[:, 0]


def _semiseg_file(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`semiseg_example` of one image file and its GT (``../GT/<stem>.png``) at ``size``."""
    from PIL import Image

    torch.set_num_threads(1)
    image8 = np.asarray(Image.open(path).convert("L"))
    infection = np.asarray(Image.open(path.parent.parent / "GT" / f"{path.stem}.png").convert("L")) > 127
    return semiseg_example(image8, infection, size)


def semiseg_example(image8: np.ndarray, infection: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One COVID-SemiSeg crop: (HU, lung label) at the network size; see the module docstring."""
    from node.pipeline.lungs import LungMethod, segment_lungs
    from node.pipeline.lungs.shapes import fill_holes_per_slice

    from .semiseg_ct import AXIAL, as_ct, volume_of

    hu, pad = as_ct(image8)
    lungs = segment_lungs(volume_of(hu, AXIAL), method=LungMethod.AERATED)
    label = lungs.lungs.copy()
    # air outside the patient in a corner of the crop is walled in by the padding: pure air, not lung
    lab, n = ndi.label(label[0])
    if n:
        median = np.array(ndi.median(hu, lab, np.arange(1, n + 1)))
        label[0] &= ~np.isin(lab, 1 + np.flatnonzero(median < OUTSIDE_AIR_MEDIAN_HU))
    label[0, pad:-pad, pad:-pad] |= infection
    return _box(hu[None], fill_holes_per_slice(label), lungs.body, size)


def phantom_examples(seed: int, burden, effusion: float, size: int,
                     consolidation_hu: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from node import phantom as ph
    from node.pipeline.lungs.body import body_mask

    rng = np.random.default_rng(seed)
    p = ph.make_phantom(rows=128, cols=128, slices=40, pixel_spacing=float(rng.uniform(2.6, 3.2)),
                        slice_spacing=7.5, seed=seed, burden=burden, effusion=effusion,
                        consolidation_hu=consolidation_hu or ph.CONSOLIDATION_HU)
    truth = p.masks["right_lung"] | p.masks["left_lung"]
    return _box(p.hu, truth, body_mask(p.hu.astype(np.float32), p.pixel_spacing), size)


def real_examples(volume, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One real series (training.real_ct): HU and the HU method's aerated lung, holes filled."""
    from node.pipeline.lungs import LungMethod, segment_lungs
    from node.pipeline.lungs.shapes import fill_holes_per_slice

    lungs = segment_lungs(volume, method=LungMethod.AERATED)
    return _box(volume.hu, fill_holes_per_slice(lungs.lungs > 0), lungs.body, size)


def dataset_path(cfg: LungNetConfig) -> Path:
    """Where :func:`build_dataset` caches the examples of ``cfg``."""
    extras = ("-real" if cfg.real else "") + ("-dense" if cfg.dense_phantoms else "")
    return Path(cfg.out) / f"dataset-v{DATASET_VERSION}-{cfg.dataset_size}{extras}.pt"


def build_dataset(cfg: LungNetConfig) -> dict[str, torch.Tensor]:
    """All examples (cached at :func:`dataset_path`): hu, label (n, size, size), source, val (bool)."""
    cache = dataset_path(cfg)
    if cache.exists():
        return torch.load(cache)
    from .data import labelled_split, load_split

    root = Path(cfg.data) / "TrainingSet" / "LungInfection-Train"
    hus, labels, source, val = [], [], [], []

    def add(x: torch.Tensor, y: torch.Tensor, src: int, is_val: bool) -> None:
        hus.append(x.half()), labels.append(y.half())
        source.extend([src] * len(x)), val.extend([is_val] * len(x))

    doctor = sorted((root / "Doctor-label" / "Imgs").glob("*.jpg"), key=lambda p: int(p.stem))
    _, val_idx = labelled_split(load_split("doctor", cfg.data))  # same order: names sorted by number
    pseudo = sorted((root / "Pseudo-label" / "Imgs").glob("*.jpg"))[::PSEUDO_EVERY]
    t0 = time.time()
    paths = doctor + pseudo
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one slice per task: independent
        examples = pool.map(functools.partial(_semiseg_file, size=cfg.dataset_size), paths, chunksize=4)
        for i, example in enumerate(examples):
            is_doctor = i < len(doctor)
            add(*example, SOURCE_DOCTOR if is_doctor else SOURCE_PSEUDO, is_doctor and i in val_idx)
            if i % 50 == 0:
                log.info("semiseg %d / %d (%.0f s)", i, len(paths), time.time() - t0)
    from node.phantom import DENSE_CONSOLIDATION_HU

    for seed, burden, effusion in PHANTOMS + [VAL_PHANTOM]:
        add(*phantom_examples(seed, burden, effusion, cfg.dataset_size), SOURCE_PHANTOM, seed == VAL_PHANTOM[0])
    add(*phantom_examples(*VAL_PHANTOM, cfg.dataset_size, DENSE_CONSOLIDATION_HU), SOURCE_PHANTOM_DENSE, True)
    if cfg.dense_phantoms:
        for seed, burden, effusion in PHANTOMS:
            if burden:  # a healthy phantom is the same with either consolidation
                add(*phantom_examples(seed, burden, effusion, cfg.dataset_size, DENSE_CONSOLIDATION_HU),
                    SOURCE_PHANTOM, False)
    if cfg.real:
        from .real_ct import real_volumes

        for volume in real_volumes(Path(cfg.data).parent):
            add(*real_examples(volume, cfg.dataset_size), SOURCE_REAL, False)
    data = {"hu": torch.cat(hus), "label": torch.cat(labels), "source": torch.tensor(source),
            "val": torch.tensor(val)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


# --------------------------------------------------------------------------------------------- training


def augment(hu: torch.Tensor, label: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips / transposition (the crops come in both orientations), scale 0.85-1.15, shift up to 6 %,
    HU offset up to 30 and noise of 10 HU; (n, s, s) each."""
    n = hu.shape[0]
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    scale = 0.85 + 0.3 * r(n)
    flip_x = torch.where(r(n) < 0.5, -1.0, 1.0)
    flip_y = torch.where(r(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip_x, scale * flip_y
    theta[:, :, 2] = (r(n, 2) - 0.5) * 0.12
    swap = r(n) < 0.5
    theta[swap] = theta[swap][:, [1, 0]]
    both = torch.stack((hu.float() + 1000.0, label.float()), 1)  # outside the image: air, not lung
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    out = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    hu_out = out[:, 0] - 1000.0 + (r(n, 1, 1) - 0.5) * 60.0 + 10.0 * torch.randn(out[:, 0].shape, generator=gen)
    return hu_out, out[:, 1]


def forward(model: LungNet, hu: torch.Tensor, size: int) -> torch.Tensor:
    """Logits (n, 1, h, w) at the examples' own size (h, w) for a network input of ``size``."""
    logits = model(lung_input(hu, size))
    if logits.shape[-2:] != hu.shape[-2:]:
        logits = F.interpolate(logits, size=hu.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
            soft_dice: bool = True) -> torch.Tensor:
    """BCE (per-pixel ``weight`` if given) + soft Dice (unless ``soft_dice`` is False: against a teacher's
    probability the cross-entropy alone is least where the two probabilities are equal)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    if not soft_dice:
        return bce
    prob = torch.sigmoid(logits)
    return bce + 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)


@torch.no_grad()
def teacher_probability(name: str, hu: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The probability (n, s, s) that the shipped network ``name`` gives the stored examples ``hu``: the target
    of a network distilled from it (``LungNetConfig.teacher``), augmented with each example as a label is."""
    from models.lungnet import folded, lung_probability
    from models.registry import load_shipped

    model, meta = load_shipped(name, device=device)
    return lung_probability(folded(model), hu.float(), int(meta["input"]["size"])).cpu()


def _loss_text(cfg: dict) -> str:
    """The loss of a run, in words (the exported sidecar's "loss")."""
    dice = " plus soft Dice" if cfg.get("soft_dice", True) else ""
    if cfg.get("teacher"):
        return f"cross-entropy{dice} against the probability of the shipped network '{cfg['teacher']}'"
    if cfg.get("dense_weight", 1.0) == 1.0:
        return f"cross-entropy{dice}"
    where = f"label lung above {AIR_HU:g} HU"
    if cfg.get("dense_border"):
        where += f" and tissue above it within {cfg['dense_border']} pixels of the lung label"
    return f"cross-entropy, {where} weighted {cfg['dense_weight']:g}" + ("," + dice if dice else "")


def dense_lung_weight(hu: torch.Tensor, label: torch.Tensor, weight: float, border: int = 0) -> torch.Tensor | None:
    """Per-pixel cross-entropy weight of (n, s, s) examples: ``weight`` on label lung above ``AIR_HU`` and,
    with ``border`` > 0, on tissue above it within ``border`` pixels of the lung label (chest wall, effusion, heart
    border: the other side of where dense lung ends); 1 elsewhere (None when ``weight`` is 1). Dense lung is a few
    per cent of the lung's pixels; consolidation, and where it stops, is what the node needs."""
    if weight == 1.0:
        return None
    lung = label >= 0.5
    if border > 0:
        lung = F.max_pool2d(lung[:, None].float(), 2 * border + 1, stride=1, padding=border)[:, 0] > 0
    dense = lung & (hu > AIR_HU)
    return 1.0 + (weight - 1.0) * dense.float()


@torch.no_grad()
def evaluate(model: LungNet, data: dict[str, torch.Tensor], pick: torch.Tensor, size: int) -> dict[str, float]:
    """Dice of the thresholded map against the labels of ``pick``, and recall of the dense lung (label lung
    above -320 HU: consolidation, vessels) per source."""
    model.eval()
    out: dict[str, float] = {}
    for name, src in (("semiseg", (SOURCE_DOCTOR,)), ("phantom", (SOURCE_PHANTOM,)),
                      ("phantom_dense", (SOURCE_PHANTOM_DENSE,))):
        sel = pick & torch.isin(data["source"], torch.tensor(src))
        if not sel.any():
            continue
        hu, label = data["hu"][sel].float(), data["label"][sel].float() >= 0.5
        dev = next(model.parameters()).device
        pred = torch.cat([forward(model, hu[i:i + 64].to(dev), size)[:, 0].cpu() >= 0
                          for i in range(0, len(hu), 64)])
        dense = label & (hu > AIR_HU)
        out[f"{name}_dice"] = float(2 * (pred & label).sum() / (pred.sum() + label.sum()))
        out[f"{name}_dense_recall"] = float((pred & dense).sum() / max(int(dense.sum()), 1))
        out[f"{name}_false_positive"] = float((pred & ~label).sum() / label.sum())
    model.train()
    return out


def train(cfg: LungNetConfig) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_data = time.time()
    data = build_dataset(cfg)
    t_data = time.time() - t_data
    train_idx = torch.nonzero(~data["val"]).flatten()
    # validation is always measured against the labels; a distilled network trains on its teacher's probability
    target, teacher = data["label"], None
    if cfg.teacher:  # its weights may later be replaced by the student's: say which ones taught it
        from models.registry import read_meta

        teacher = {"name": cfg.teacher, "sha256": read_meta(cfg.teacher)["sha256"]}
        target = teacher_probability(cfg.teacher, data["hu"], cfg.device)
    src = data["source"][train_idx]
    weights = torch.where(src == SOURCE_DOCTOR, float(DOCTOR_REPEAT), torch.where(src == SOURCE_REAL,
                                                                                  float(REAL_REPEAT), 1.0))
    per_epoch = cfg.samples_per_epoch
    steps = per_epoch // cfg.batch
    if cfg.max_batches:
        steps = min(steps, cfg.max_batches)
    dev = torch.device(cfg.device)
    if cfg.init:
        from models.registry import load_shipped

        model, meta = load_shipped(cfg.init)
        if list(meta["model_config"]["channels"]) != list(cfg.channels):
            raise ValueError(f"--init {cfg.init} has channels {meta['model_config']['channels']}, not {cfg.channels}")
        model = model.train().to(dev)
    else:
        model = LungNet(channels=cfg.channels).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    gen = torch.Generator().manual_seed(cfg.seed)
    history = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        order = train_idx[torch.multinomial(weights, per_epoch, replacement=True, generator=gen)]
        running = 0.0
        for b in range(steps):
            idx = order[b * cfg.batch:(b + 1) * cfg.batch]
            hu, label = augment(data["hu"][idx], target[idx], gen)
            weight = dense_lung_weight(hu, label, cfg.dense_weight, cfg.dense_border)
            loss = loss_fn(forward(model, hu.to(dev), cfg.size), label[:, None].to(dev),
                           None if weight is None else weight[:, None].to(dev), cfg.soft_dice)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            if (b + 1) % 10 == 0:
                log.info("epoch %d step %d / %d loss %.4f (%.0f s)", epoch + 1, b + 1, steps, running / (b + 1),
                         time.time() - t0)
        row = {"epoch": epoch + 1, "loss": running / max(steps, 1), "wall_s": round(time.time() - t0, 1),
               **evaluate(model, data, data["val"], cfg.size)}
        history.append(row)
        log.info("%s", row)
        print(json.dumps(row), flush=True)
    ckpt = {"arch": "lungnet", "model_config": model.config,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "run_config": asdict(cfg), "history": history}
    if teacher:
        ckpt["teacher"] = teacher
    torch.save(ckpt, out / "last.pt")
    summary = {"final": history[-1], "train_examples": int(len(train_idx)),
               "val_examples": int(data["val"].sum()), "dataset_s": round(t_data, 1),
               "train_s": round(time.time() - t0, 1), "torch": torch.__version__}
    (out / "metrics.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    return summary


def export(ckpt_path: str, name: str = "lungnet", out_dir: str = "models/weights") -> dict:
    """fp16 safetensors + sidecar JSON (architecture, input, sha256, training data, licence)."""
    from safetensors.torch import save_file

    from models.registry import sha256_file

    ckpt = torch.load(ckpt_path, weights_only=False)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in ckpt["state_dict"].items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    st = out / f"{name}.safetensors"
    save_file(sd, str(st))
    os.chmod(st, 0o644)
    cfg = ckpt["run_config"]
    meta = {
        "name": name, "arch": ckpt["arch"], "model_config": ckpt["model_config"], "dtype": "float16",
        "sha256": sha256_file(st), "file": st.name,
        "parameters": int(sum(v.numel() for k, v in ckpt["state_dict"].items() if "running" not in k
                              and "num_batches" not in k)),
        "input": {"channels": f"HU of the body box of an axial slice in two windows, (centre, width) "
                              f"{list(LUNG_WINDOW)} and {list(SOFT_WINDOW)}, each scaled to [0, 1] "
                              "(models.lungnet.lung_input)", "size": cfg["size"]},
        "output": "one logit per pixel: lung (aerated or dense) against everything else",
        "training_data": {
            "covid_semiseg": f"TrainingSet/LungInfection-Train: 40 of the 50 doctor-labelled slices (10 held out "
                             f"for validation, training.data.labelled_split) and every {PSEUDO_EVERY}th of the "
                             "1600 pseudo-labelled slices; label = aerated lung of the node's HU steps "
                             "(segment_lungs method 'aerated') united with the infection mask, holes filled; "
                             "the 48 test slices were not used",
            "phantoms": f"node.phantom.make_phantom, seeds {[p[0] for p in PHANTOMS]} (validation: seed "
                        f"{VAL_PHANTOM[0]}), consolidation and dependent effusion (not lung); true lung labels",
            **({"real_ct": "training.real_ct: dicom/abdomen-j2k-series (20 slices, lung bases) and "
                           "nifti/chest-crop-1.5mm.nii.gz (112 slices around the heart, padded as the crops are), "
                           f"weighted {REAL_REPEAT}x; label = aerated lung of the node's HU steps, holes filled; "
                           "real chest walls, mediastinum and axillae as not lung"} if cfg.get("real") else {}),
            **({"dense_phantoms": "the diseased phantoms once more with airless consolidation "
                                  "(node.phantom.DENSE_CONSOLIDATION_HU)"} if cfg.get("dense_phantoms") else {}),
        },
        **({"initialised_from": cfg["init"]} if cfg.get("init") else {}),
        **({"distilled_from": ckpt["teacher"]} if ckpt.get("teacher") else {}),
        "loss": _loss_text(cfg),
        "selection": "none: the last epoch of a fixed schedule (docs/lungs.md)",
        "run_config": cfg, "history": ckpt["history"],
        "licence": "weights trained on COVID-SemiSeg (Inf-Net): non-commercial use only",
    }
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2))
    return meta

