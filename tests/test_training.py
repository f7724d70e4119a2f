"""Training package: metrics against hand-computed cases, losses, augmentation, data loader, tiny runs."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from training import metrics as M  # noqa: E402
from training.augment import AugConfig, augment, cutout  # noqa: E402
from training.losses import coach_loss, masked_l1, multiclass_loss, seg_loss, structure_loss  # noqa: E402
from tests.support import SHARED_DATA  # noqa: E402

pytestmark = pytest.mark.unit

torch.set_num_threads(1)
DATA = SHARED_DATA / "covid-semiseg"
needs_data = pytest.mark.skipif(not (DATA / "TestingSet").is_dir(), reason="COVID-SemiSeg not available")


# ----------------------------------------------------------------------------------------------- metrics
def test_dice_sen_spec_hand_computed():
    gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)     # 4 positives
    pr = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool)     # TP 3, FP 1, FN 1, TN 3
    assert M.confusion(pr, gt) == (3, 1, 1, 3)
    assert M.dice(pr, gt) == pytest.approx(6 / 8)
    assert M.sensitivity(pr, gt) == pytest.approx(3 / 4)
    assert M.specificity(pr, gt) == pytest.approx(3 / 4)
    assert M.dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


def test_one_dice_with_an_explicit_empty_convention():
    from models.metrics import dice

    empty = np.zeros((2, 3), bool)
    a = np.array([[1, 1, 0], [0, 0, 0]], bool)
    b = np.array([[1, 0, 0], [0, 0, 1]], bool)
    assert dice(a, b) == pytest.approx(2 * 1 / 4)
    assert dice(empty, empty) is None                 # undefined unless the caller says how it counts
    assert dice(empty, empty, empty=1.0) == 1.0
    assert dice(a, empty, empty=1.0) == 0.0           # one empty mask is a plain miss, not the empty case
    assert M.dice(b, a) == dice(a, b)                 # training's Dice is the same function...
    assert M.dice(empty, empty) == 1.0                # ...counting two empty masks as a match (Inf-Net toolbox)
    assert M.dice(a, np.where(b, 0.7, 0.3)) == dice(a, b)  # ground truth binarised at 0.5
    with pytest.raises(ValueError, match="shapes"):
        dice(a, a[:1])


def test_mae_hand_computed():
    assert M.mae(np.array([[0.0, 0.5], [1.0, 0.25]]), np.array([[0, 1], [1, 0]])) == pytest.approx((0 + .5 + 0 + .25) / 4)


def test_toolbox_metrics_on_hand_made_maps():
    """training.toolbox against values worked out by hand from the Inf-Net toolbox's rules."""
    from training.toolbox import toolbox_metrics

    gt = np.array([[True, False]])
    # a perfect map: every threshold t > 0 gives Dice 1; t = 0 marks both pixels (2/3); specificity 0 there
    m = toolbox_metrics(np.array([[1.0, 0.0]]), gt)
    assert m["mean_dice"] == pytest.approx((255 + 2 / 3) / 256)
    assert m["mean_sen"] == pytest.approx(1.0) and m["mean_spec"] == pytest.approx(255 / 256)
    assert m["mae"] == 0.0
    # min-max normalisation: 0.6 / 0.2 become 1 / 0, the same map
    assert toolbox_metrics(np.array([[0.6, 0.2]]), gt)["mean_dice"] == pytest.approx((255 + 2 / 3) / 256)
    # a constant map normalises to zeros: only t = 0 overlaps the truth
    m = toolbox_metrics(np.array([[0.5, 0.5]]), gt)
    assert m["mean_dice"] == pytest.approx((2 / 3) / 256) and m["mean_spec"] == 0.0
    # nothing to find and nothing found: Dice 0 at every threshold (the toolbox's rule when TP = 0)
    assert toolbox_metrics(np.zeros((2, 2)), np.zeros((2, 2), bool))["mean_dice"] == 0.0
    # the wrong pixel: TP = 0 except at t = 0
    m = toolbox_metrics(np.array([[0.0, 1.0]]), gt)
    assert m["mean_dice"] == pytest.approx((2 / 3) / 256) and m["mae"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        toolbox_metrics(np.zeros((2, 2)), gt)


def test_toolbox_e_phi_equals_the_per_threshold_definition():
    from training.toolbox import THRESHOLDS, as_saved_map, toolbox_metrics

    gt = np.array([[1, 0], [0, 0]], bool)
    assert M.e_measure_binary(gt, gt) == pytest.approx(4 / 3)  # perfect: sum of ones / (N - 1)
    # all-negative GT: enhanced = 1 - FM
    assert M.e_measure_binary(np.array([[1, 0], [0, 0]]), np.zeros((2, 2))) == pytest.approx(3 / 3)
    rng = np.random.default_rng(1)
    p, g = rng.random((20, 23)), rng.random((20, 23)) > 0.6
    sal = as_saved_map(p)
    ref = np.mean([M.e_measure_binary(sal >= t, g) for t in THRESHOLDS])
    assert toolbox_metrics(p, g)["mean_e_phi"] == pytest.approx(ref)
    ref_dice = []
    for t in THRESHOLDS:
        b = sal >= t
        tp = (b & g).sum()
        ref_dice.append(0.0 if tp == 0 else 2 * tp / (b.sum() + g.sum()))
    assert toolbox_metrics(p, g)["mean_dice"] == pytest.approx(np.mean(ref_dice))


def test_slice_bootstrap_interval():
    from training.evaluation import summarise

    rows = [{"dice": v, "tp_infection": t, "den_infection": d} for v, t, d in ((0.2, 1, 10), (0.4, 2, 10), (0.9, 9, 20))]
    s = summarise(rows, ["dice", "pooled_dice_infection"], n_boot=500)
    assert s["dice"]["value"] == pytest.approx(0.5)
    assert s["pooled_dice_infection"]["value"] == pytest.approx(2 * 12 / 40)
    assert 0.2 <= s["dice"]["ci_low"] < 0.5 < s["dice"]["ci_high"] <= 0.9
    constant = summarise([{"dice": 0.7}] * 5, ["dice"], n_boot=100)["dice"]
    assert constant["ci_low"] == constant["ci_high"] == pytest.approx(0.7)


def test_evaluation_runs_the_engines_code():
    """training.evaluation's maps are exactly what the node's engine computes for the same crop."""
    from models.factory import build_model
    from models.predict import InfNetPredictor
    from training.evaluation import engine_predictor, predict

    torch.manual_seed(0)
    model = build_model("infnet-compact").eval()
    img = (np.random.default_rng(0).random((70, 90)) * 255).astype(np.uint8)
    ours = predict(engine_predictor(model, 64, "cpu", tta=True), [img])[0][0]
    engine = InfNetPredictor(model=model, meta={"input": {"size": 64}}, multiclass=None, device="cpu", tta=True)
    theirs = engine.predict_crops([img.astype(np.float32) / 255])[0][0]
    assert ours.shape == img.shape
    np.testing.assert_array_equal(ours, theirs)


def test_s_measure_cases():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    assert M.s_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-6)  # perfect prediction
    assert M.s_measure(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0              # empty GT, empty pred
    assert M.s_measure(np.full((4, 4), 0.25), np.zeros((4, 4))) == pytest.approx(0.75)
    assert M.s_measure(np.full((4, 4), 0.25), np.ones((4, 4))) == pytest.approx(0.25)
    # all-zero prediction, GT = top-left 2x2 of 4x4. Object term: O_fg = 0, O_bg = 2*1/(1+1+0) = 1,
    # S_obj = u*0 + (1-u)*1 = 0.75. Region term: centroid (X, Y) = (2, 2) splits into four constant quadrants;
    # the toolbox's ssim gives 1 when alpha = beta = 0 (constant maps), so S_reg = 1. S = 0.5*0.75 + 0.5*1.
    assert M.s_measure(np.zeros((4, 4)), gt) == pytest.approx(0.875)


def test_multiclass_dice():
    gt = np.array([[0, 1, 1, 2]])
    pr = np.array([[0, 1, 2, 2]])
    d = M.multiclass_dice(pr, gt)
    assert d[1] == pytest.approx(2 / 3) and d[2] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------- losses
def test_structure_loss_prefers_correct_logits():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    good = structure_loss((mask * 2 - 1) * 10, mask)
    bad = structure_loss(-(mask * 2 - 1) * 10, mask)
    assert good < 0.05 < bad


def test_seg_loss_sums_four_maps_and_edge():
    mask = torch.zeros(1, 1, 16, 16)
    z = torch.zeros(1, 1, 16, 16)
    l4 = 4 * structure_loss(z, mask)
    assert seg_loss([z] * 5, mask, None) == pytest.approx(float(l4))
    assert seg_loss([z] * 5, mask, mask) == pytest.approx(float(l4) + np.log(2), rel=1e-5)


def test_masked_l1_counts_erased_region_only():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.ones(1, 1, 4, 4)
    keep = torch.ones(1, 1, 4, 4)
    keep[..., :2, :] = 0          # top half erased
    y2 = y.clone()
    y2[..., 2:, :] = 5            # errors in the kept region are ignored
    assert masked_l1(y2, x, keep) == pytest.approx(1.0)
    assert coach_loss(masked_l1(y2, x, keep)) == pytest.approx(0.0)


def test_multiclass_loss_finite_and_ordered():
    lab = torch.zeros(1, 1, 8, 8)
    lab[..., :4, :] = 1
    lab[..., 6:, :] = 2
    oh = torch.nn.functional.one_hot(lab[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    assert multiclass_loss(oh * 10, lab) < multiclass_loss(torch.zeros(1, 3, 8, 8), lab)


# ----------------------------------------------------------------------------------------------- augmentation
def test_augment_shapes_and_labels_stay_labels():
    g = torch.Generator().manual_seed(0)
    b = {"image": torch.rand(3, 1, 40, 40), "mask": (torch.rand(3, 1, 40, 40) > 0.5).float(),
         "label": torch.randint(0, 3, (3, 1, 40, 40)).float()}
    out = augment(b, 32, AugConfig(enabled=True, cutout=0.4), g)
    assert all(v.shape == (3, 1, 32, 32) for v in out.values())
    assert set(out["label"].unique().tolist()) <= {0.0, 1.0, 2.0}


def test_augment_disabled_is_resize_only():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 1, 16, 16)
    out = augment({"image": img}, 16, AugConfig(enabled=False), g)
    assert torch.allclose(out["image"], img, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.5])
def test_cutout_area(ratio):
    g = torch.Generator().manual_seed(0)
    img = torch.ones(200, 1, 50, 50)
    out = cutout(img, ratio, p=1.0, gen=g)
    erased = (out == 0).float().mean(dim=(1, 2, 3))
    assert float(erased.max()) == pytest.approx(ratio, abs=0.03)   # full square when inside the image
    assert float(erased.min()) > 0


# ----------------------------------------------------------------------------------------------- data + runs
@needs_data
def test_loader_counts():
    from training.data import grouped_folds, labelled_split, load_split, patient_groups

    d = load_split("doctor", DATA)
    assert len(d) == 50 and len(d.edges) == 50
    assert d.images[0].dtype == np.uint8 and d.images[0].shape == d.masks[0].shape
    t = load_split("test", DATA)
    assert len(t) == 48
    mt = load_split("multi-test", DATA)
    assert set(np.unique(np.concatenate([m.ravel() for m in mt.masks]))) <= {0, 1, 2}
    tr, va = labelled_split(d)
    assert len(tr) + len(va) == 50 and 9 <= len(va) <= 11 and not set(tr) & set(va)
    assert labelled_split(d) == (tr, va)  # fixed
    groups = patient_groups(d.images)
    names = {n: g for n, g in zip(d.names, groups)}
    assert names["10.jpg"] == names["43.jpg"] and names["5.jpg"] == names["46.jpg"]  # near-duplicates
    assert len(set(groups)) == 43
    folds = grouped_folds(groups)
    assert sorted(i for f in folds for i in f) == list(range(50))
    for f in folds:  # no patient group in two folds
        assert not {groups[i] for i in f} & {groups[i] for g in folds if g is not f for i in g}
    assert labelled_split(d, fold=2)[1] == folds[2]


def test_tiny_training_lowers_the_loss():
    from models.factory import build_model

    torch.manual_seed(0)
    if (DATA / "TrainingSet").is_dir():
        from training.data import load_split, normalize, stack
        t = stack(load_split("doctor", DATA).subset([0, 1, 2, 3]), 64)
        x, mask, edge = normalize(t["image"]), t["mask"], t["edge"]
    else:  # synthetic fallback
        x = torch.randn(4, 1, 64, 64)
        mask = (x > 1).float()
        edge = torch.zeros_like(mask)
    model = build_model("infnet-compact").train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = seg_loss(model(x), mask, edge)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


@needs_data
def test_cli_tiny_run_resume_evaluate_export(tmp_path):
    from training.cli import main

    rd = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(rd), "--train-limit", "4", "--epochs", "1",
                 "--aug", "--cutout", "0.4"]) == 0
    for f in ("config.json", "log.txt", "metrics.json", "last.pt", "best.pt"):
        assert (rd / f).exists(), f
    # resume continues at epoch 2
    assert main(["train", "--preset", "tiny", "--run-dir", str(rd), "--train-limit", "4", "--epochs", "2",
                 "--resume"]) == 0
    hist = json.loads((rd / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert "resumed" in (rd / "log.txt").read_text()
    # export + registry round trip
    assert main(["export", "--ckpt", str(rd / "best.pt"), "--name", "tiny", "--out-dir", str(tmp_path / "w")]) == 0
    from models.registry import load_shipped
    model, meta = load_shipped("tiny", weights_dir=tmp_path / "w")
    assert meta["arch"] == "infnet-compact"


@needs_data
def test_cli_tiny_pretrain_then_finetune(tmp_path):
    from training.cli import main

    assert main(["pretrain", "--preset", "tiny", "--run-dir", str(tmp_path / "p"), "--epochs", "2",
                 "--max-batches", "1"]) == 0
    hist = json.loads((tmp_path / "p" / "metrics.json").read_text())["history"]
    assert hist[0]["coach_loss"] is None and hist[1]["coach_loss"] is not None  # coach steps from epoch 2
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "f"), "--train-limit", "4",
                 "--init", str(tmp_path / "p" / "pretrained.pt")]) == 0
    assert "source mode inpaint" in (tmp_path / "f" / "log.txt").read_text()


@needs_data
def test_cli_train_multi_on_a_single_class_models_prior(tmp_path):
    """train-multi --prior-ckpt: the priors are that model's binarised flip-TTA maps (what the engine gives the
    multi-class net), the cached data set keeps its own priors, and export --tta records the engine setting."""
    from training.cli import main
    from training.data import load_split

    single = tmp_path / "single"
    assert main(["train", "--preset", "tiny", "--run-dir", str(single), "--train-limit", "4", "--epochs", "1"]) == 0
    cached = [p.copy() for p in load_split("multi-train", DATA).priors]
    multi = tmp_path / "multi"
    assert main(["train-multi", "--preset", "tiny", "--run-dir", str(multi), "--train-limit", "4", "--epochs", "1",
                 "--prior-ckpt", str(single / "best.pt")]) == 0
    assert f"priors: {single / 'best.pt'} (binarised at 0.5, flip TTA)" in (multi / "log.txt").read_text()
    assert all((a == b).all() for a, b in zip(cached, load_split("multi-train", DATA).priors))
    assert main(["export", "--ckpt", str(single / "best.pt"), "--name", "tiny", "--out-dir", str(tmp_path / "w"),
                 "--tta", "flips"]) == 0
    assert json.loads((tmp_path / "w" / "tiny.json").read_text())["inference"] == {"tta": "flips"}


@needs_data
def test_schedule_runs_every_row_end_to_end_on_the_tiny_preset(tmp_path):
    """training.schedule (what training/gpu_schedule.sh runs on a GPU with gpu-full) on the tiny preset, one
    seed: every stage, row, multi-class net, fold and test evaluation, and the tables, so a GPU run does not
    find it broken."""
    from training.schedule import main
    from training.table import CV_CANDIDATES, ROWS, markdown

    assert main(["--preset", "tiny", "--root", str(tmp_path), "--seeds", "0"]) == 0
    for key, _ in ROWS:
        test = json.loads((tmp_path / "seed0" / key / "test_metrics.json").read_text())
        assert test["n"] == 48 and test["tta"] == "flips" and len(test["single_rows"]) == 48
        assert test["single"]["mean_dice"]["ci_low"] <= test["single"]["mean_dice"]["value"]
    multi = json.loads((tmp_path / "seed0" / "multi-selfsup-aug04" / "test_metrics.json").read_text())
    assert len(multi["multi_rows"]) == 48
    for key in CV_CANDIDATES:
        assert len(list((tmp_path / "seed0" / f"cv-{key}").glob("fold*/metrics.json"))) == 5
    table = markdown(tmp_path)
    assert table.count("[") >= len(ROWS) and "pretrain-raw" in table
    assert "selfsup-aug04 - selfsup-raw-aug04" in table  # the coach ablation, paired by seed


def test_paired_difference_pairs_seeds_and_slices():
    """a - b per seed, and a slice-bootstrap interval of the per-slice difference averaged over the seeds."""
    from training.table import paired_difference

    def rows(values):
        return [{"mean_dice": v} for v in values]

    a = [rows([0.5, 0.6, 0.7, 0.8]), rows([0.6, 0.6, 0.6, 0.6])]
    b = [rows([0.4, 0.5, 0.6, 0.7]), rows([0.6, 0.6, 0.6, 0.6])]
    diff = paired_difference(a, b)
    assert diff["per_seed"] == pytest.approx([0.1, 0.0])
    assert diff["value"] == pytest.approx(0.05)
    assert diff["ci_low"] == pytest.approx(0.05) and diff["ci_high"] == pytest.approx(0.05)  # every slice +0.05
    uneven = paired_difference([rows([0.9, 0.5])], [rows([0.5, 0.5])])
    assert uneven["ci_low"] == pytest.approx(0.0) and uneven["ci_high"] == pytest.approx(0.4)
    assert paired_difference([[]], [rows([0.5])]) is None  # no seed with both rows


@needs_data
def test_cli_validate_uses_the_validation_split(tmp_path, capsys):
    from training.cli import main

    rd = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(rd), "--train-limit", "4", "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["validate", "--preset", "tiny", "--ckpt", str(rd / "best.pt"), "--tta"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 10 and out["tta"] == "flips" and 0.0 <= out["dice"] <= 1.0


def test_schedule_resumes_a_run_stopped_part_way(tmp_path, monkeypatch):
    """A stage or row whose last.pt exists without metrics.json (the process was stopped mid-run) is started
    with --resume; a run never started is not, and a finished one is skipped."""
    import training.schedule as schedule

    calls = []
    monkeypatch.setattr(schedule, "cli", lambda argv: calls.append(argv))
    root = tmp_path / "runs"
    (root / "stages" / "pretrain").mkdir(parents=True)
    (root / "stages" / "pretrain" / "last.pt").write_bytes(b"")
    (root / "seed0" / "sinfnet").mkdir(parents=True)
    (root / "seed0" / "sinfnet" / "metrics.json").write_text("{}")
    schedule.main(["--preset", "tiny", "--root", str(root), "--seeds", "0",
                   "--only", "pretrain", "sinfnet", "sinfnet-aug04"])
    by_dir = {argv[argv.index("--run-dir") + 1]: argv for argv in calls if "--run-dir" in argv}
    assert "--resume" in by_dir[f"{root}/stages/pretrain"]
    assert "--resume" not in by_dir[f"{root}/seed0/sinfnet-aug04"]
    assert f"{root}/seed0/sinfnet" not in by_dir
