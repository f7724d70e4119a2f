"""Run configuration and presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .paths import semiseg_root

PRESETS = {
    # reduced CPU configuration: compact model, 160 px, single scale, few epochs
    "cpu-small": dict(arch="infnet-compact", size=160, scales=[1.0], batch=8, epochs=40, lr=1e-3,
                      val_every=2, eval_size=160, pretrain_epochs=6, pretrain_limit=160, pseudo_limit=200,
                      pseudo_epochs=6, multi_base=12, num_threads=1),
    # full GPU schedule: compact model, 352 px, multi-scale (0.75, 1, 1.25) as Inf-Net
    "gpu-full": dict(arch="infnet-compact", size=352, scales=[0.75, 1.0, 1.25], batch=16, epochs=60, lr=1e-3,
                     val_every=2, eval_size=352, pretrain_epochs=12, pretrain_limit=1640, pseudo_limit=None,
                     pseudo_epochs=6, multi_base=16, num_threads=0),
    # unit tests
    "tiny": dict(arch="infnet-compact", size=64, scales=[1.0], batch=4, epochs=1, lr=1e-3, val_every=1,
                 eval_size=64, pretrain_epochs=1, pretrain_limit=8, pseudo_limit=8, pseudo_epochs=1,
                 multi_base=4, num_threads=1),
}


@dataclass
class RunConfig:
    command: str = "train"
    preset: str = "cpu-small"
    arch: str = "infnet-compact"
    data: str = field(default_factory=lambda: str(semiseg_root()))  # --data; see training/paths.py
    run_dir: str = "runs/default"
    seed: int = 0
    split_seed: int = 0
    n_val: int = 10
    fold: int | None = None           # cross-validation fold (training.data.N_FOLDS grouped folds) as validation
    device: str = "cpu"
    size: int = 160
    scales: list = field(default_factory=lambda: [1.0])
    batch: int = 8
    epochs: int = 40
    lr: float = 1e-3
    weight_decay: float = 1e-4
    clip: float = 0.5
    lam: float = 1.0
    val_every: int = 2
    eval_size: int = 160
    # augmentation
    aug: bool = False
    cutout: float = 0.0
    # data selection
    train_set: str = "doctor"          # doctor | pseudo
    pseudo_limit: int | None = None
    train_limit: int | None = None     # cap on training slices (tests)
    init: str | None = None            # checkpoint to initialise from (pretrain or pseudo stage)
    # pretraining (Algorithm 2)
    pretrain_epochs: int = 8
    pretrain_limit: int | None = 240
    coach_steps: int = 5
    keep: float = 0.75
    alpha: float = 1.0
    coach_scale: float = 8.0           # models.coach score_scale; 0 = raw scores (the ablation)
    # semi
    pseudo_epochs: int = 6
    # multi-class
    multi_base: int = 12
    prior_ckpt: str | None = None      # single-class model giving the test-time prior
    # misc
    num_threads: int = 1
    amp: bool = True
    max_batches: int | None = None     # cap per epoch (tests)

    def to_dict(self):
        return asdict(self)
