"""The lung network: architecture, training loop and export (training/lungnet.py), shipped weights, and
``segment_lungs(method="net")`` on phantoms it was not trained on (docs/lungs.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.lungnet import LungNet, folded, lung_input, lung_probability
from models.registry import WEIGHTS_DIR, load_shipped
from node import phantom as ph
from node.pipeline.lungs import LungMethod, lung_method, segment_lungs

pytestmark = pytest.mark.unit

MAX_WEIGHTS_BYTES = 2_000_000


def test_network_maps_any_crop_to_a_probability_of_its_own_size():
    model = LungNet().eval()
    hu = torch.full((3, 70, 90), -1000.0)
    assert lung_input(hu, 32).shape == (3, 2, 32, 32)
    prob = lung_probability(model, hu, size=32)
    assert prob.shape == (3, 70, 90) and float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0


def test_folding_batch_normalisation_keeps_the_shipped_network_s_output():
    model, meta = load_shipped("lungnet")
    fast = folded(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the loaded model is untouched
    hu = torch.linspace(-1000.0, 200.0, 2 * 90 * 110).reshape(2, 90, 110)
    hu[:, 30:60, 20:50] = -850.0
    size = int(meta["input"]["size"])
    assert torch.allclose(lung_probability(fast, hu, size), lung_probability(model.eval(), hu, size), atol=1e-5)


def test_examples_are_made_and_cached_at_the_dataset_size(tmp_path):
    """A network with a finer input trains on finer examples: each dataset size has its own cache, and a
    COVID-SemiSeg slice is made at that size."""
    from tests.support import SHARED_DATA, skip_or_fail
    from training import lungnet

    coarse = lungnet.LungNetConfig(out=str(tmp_path))
    fine = lungnet.LungNetConfig(out=str(tmp_path), dataset_size=192)
    assert coarse.dataset_size == lungnet.DATASET_SIZE == 128
    assert lungnet.dataset_path(coarse) != lungnet.dataset_path(fine)
    image = SHARED_DATA / "covid-semiseg" / "TrainingSet" / "LungInfection-Train" / "Doctor-label" / "Imgs" / "1.jpg"
    if not image.exists():
        skip_or_fail(f"COVID-SemiSeg not found at {image}")
    hu, label = lungnet._semiseg_file(image, size=96)
    assert hu.shape == label.shape == (1, 96, 96)
    assert 0.1 < float(label.float().mean()) < 0.9  # lung and not lung


def test_examples_are_read_from_the_data_folder_the_environment_names(tmp_path, monkeypatch):
    """``CTNODE_DATA`` moves the default data folder of every training command, the lung network's too (the GPU
    script's checkout has no ../shared beside it)."""
    from training import lungnet

    monkeypatch.setenv("CTNODE_DATA", str(tmp_path))
    assert lungnet.LungNetConfig().data == str(tmp_path / "covid-semiseg")
    monkeypatch.delenv("CTNODE_DATA")
    assert lungnet.LungNetConfig().data.endswith("shared/data/covid-semiseg")


def test_training_loop_and_export_round_trip(tmp_path, capsys):
    from training import lungnet

    n, size = 6, 32
    label = torch.zeros(n, size, size)
    label[:, 8:24, 4:14] = 1
    data = {"hu": torch.where(label > 0, -850.0, 40.0).half(), "label": label.half(),
            "source": torch.tensor([lungnet.SOURCE_DOCTOR, lungnet.SOURCE_PHANTOM] * 3),
            "val": torch.tensor([False, False, False, False, True, True])}
    cfg = lungnet.LungNetConfig(out=str(tmp_path), size=16, dataset_size=size, channels=[4, 8], epochs=2, batch=2,
                                max_batches=2)
    torch.save(data, lungnet.dataset_path(cfg))  # any network input size works with any example size
    summary = lungnet.train(cfg)
    assert summary["final"]["epoch"] == 2 and summary["val_examples"] == 2
    assert {"semiseg_dice", "phantom_dice"} <= set(summary["final"])
    meta = lungnet.export(str(tmp_path / "last.pt"), "lungnet-test", str(tmp_path / "weights"))
    model, loaded = load_shipped("lungnet-test", tmp_path / "weights")
    assert loaded["sha256"] == meta["sha256"] and loaded["input"]["size"] == 16
    assert "non-commercial" in loaded["licence"]
    assert isinstance(model, LungNet)
    from training.cli import main

    capsys.readouterr()
    assert main(["lungnet-evaluate", "--name", "lungnet-test", "--weights-dir", str(tmp_path / "weights"),
                 "--out", str(tmp_path), "--dataset-size", str(size)]) == 0  # the cache of that size, not built
    figures = json.loads(capsys.readouterr().out)  # the training loop's measures, on the validation examples
    assert {"semiseg_dense_recall", "phantom_false_positive"} <= set(figures)


def test_a_distilled_network_trains_against_its_teacher_s_probability_and_names_it(tmp_path, monkeypatch):
    from training import lungnet

    n, size = 4, 32
    label = torch.zeros(n, size, size)
    label[:, 8:24, 4:14] = 1
    data = {"hu": torch.where(label > 0, -850.0, 40.0).half(), "label": label.half(),
            "source": torch.tensor([lungnet.SOURCE_DOCTOR] * n), "val": torch.tensor([False, False, False, True])}
    weights = tmp_path / "weights"
    teacher = lungnet.LungNetConfig(out=str(tmp_path / "teacher"), size=16, dataset_size=size, channels=[4, 8],
                                    epochs=1, batch=2, max_batches=1)
    Path(teacher.out).mkdir()
    torch.save(data, lungnet.dataset_path(teacher))
    lungnet.train(teacher)
    lungnet.export(str(Path(teacher.out) / "last.pt"), "lungnet-teacher", str(weights))
    monkeypatch.setattr("models.registry.WEIGHTS_DIR", weights)
    expected = lungnet.teacher_probability("lungnet-teacher", data["hu"])
    assert expected.shape == label.shape and not torch.equal(expected, label)  # an untrained teacher's guess

    seen = []
    augment = lungnet.augment
    monkeypatch.setattr(lungnet, "augment", lambda hu, target, gen: seen.append(target) or augment(hu, target, gen))
    student = lungnet.LungNetConfig(out=str(tmp_path / "student"), size=16, dataset_size=size, channels=[2, 4],
                                    epochs=1, batch=2, max_batches=2, teacher="lungnet-teacher")
    Path(student.out).mkdir()
    torch.save(data, lungnet.dataset_path(student))
    lungnet.train(student)
    train_rows = torch.tensor([0, 1, 2])
    for target in seen:  # each batch's targets are rows of the teacher's probability of the training examples
        assert any(torch.allclose(target[0].float(), expected[i]) for i in train_rows)
    meta = lungnet.export(str(Path(student.out) / "last.pt"), "lungnet-student", str(weights))
    assert meta["distilled_from"] == {"name": "lungnet-teacher", "sha256": load_shipped("lungnet-teacher",
                                                                                      weights)[1]["sha256"]}
    assert "'lungnet-teacher'" in meta["loss"]


def test_without_soft_dice_the_loss_is_least_where_the_probability_equals_the_teacher_s():
    from training import lungnet

    teacher = torch.tensor([0.1, 0.3, 0.6, 0.9]).reshape(1, 1, 2, 2)
    for soft_dice, stationary in ((False, True), (True, False)):
        logits = torch.logit(teacher).requires_grad_()
        lungnet.loss_fn(logits, teacher, soft_dice=soft_dice).backward()
        assert (logits.grad.abs().max() < 1e-6) == stationary  # the soft Dice pulls a soft map towards 0 or 1


def test_dense_lung_weight_weighs_only_label_lung_above_the_dense_threshold():
    from training import lungnet

    hu = torch.tensor([[-850.0, -200.0], [-200.0, 40.0]])[None]
    label = torch.tensor([[1.0, 1.0], [0.0, 0.0]])[None]  # aerated lung, dense lung, dense not-lung, soft tissue
    assert lungnet.dense_lung_weight(hu, label, 1.0) is None
    assert lungnet.dense_lung_weight(hu, label, 4.0).tolist() == [[[1.0, 4.0], [1.0, 1.0]]]
    logits = torch.zeros(1, 1, 2, 2)
    weighted = lungnet.loss_fn(logits, label[:, None], lungnet.dense_lung_weight(hu, label, 4.0)[:, None])
    assert weighted > lungnet.loss_fn(logits, label[:, None])  # the uncertain dense-lung pixel counts 4 times
    # with a border of one pixel, the dense not-lung beside the lung counts too; the soft tissue beyond it does not
    wide = torch.full((1, 1, 4), 40.0)
    wide[0, 0, 0] = -200.0
    border = lungnet.dense_lung_weight(wide, torch.tensor([[[1.0, 0.0, 0.0, 0.0]]]), 4.0, border=1)
    assert border.tolist() == [[[4.0, 4.0, 1.0, 1.0]]]


def test_shipped_weights_are_small_and_documented():
    meta = json.loads((WEIGHTS_DIR / "lungnet.json").read_text())
    assert (WEIGHTS_DIR / "lungnet.safetensors").stat().st_size < MAX_WEIGHTS_BYTES
    assert "non-commercial" in meta["licence"] and "covid_semiseg" in meta["training_data"]
    model, _ = load_shipped("lungnet")
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 600_000


def test_lung_method_names():
    assert lung_method("hu") is LungMethod.HU and lung_method("net") is LungMethod.NET
    with pytest.raises(ValueError):
        lung_method("thresholds")


@pytest.fixture(scope="module")
def effusion_phantom() -> ph.Phantom:
    # not a training or validation phantom of training/lungnet.py (other seed, size and spacing)
    return ph.make_phantom(rows=144, cols=144, slices=48, pixel_spacing=2.5, slice_spacing=6.0, seed=21,
                           burden={"right_lower": 0.9, "left_lower": 0.7}, effusion=0.15)


def test_net_keeps_more_consolidation_than_the_hu_method_and_leaves_out_effusion(effusion_phantom):
    """Measured (2026-12-04): 0.864 of the consolidation inside the lungs (the HU method: 0.719), false-positive
    lung 1.03 % of the lung (HU: 2.11 %), 0.20 % in the effusion (HU: 0.10 %), no voxel on the wrong side."""
    p = effusion_phantom
    truth = p.masks["right_lung"] | p.masks["left_lung"]
    cons = p.masks["consolidation"]
    hu = segment_lungs(p.as_volume(), method="hu").lungs
    lungs = segment_lungs(p.as_volume(), method="net")
    fp = lungs.lungs & ~truth
    assert (cons & lungs.lungs).sum() >= (cons & hu).sum() + 0.1 * cons.sum()
    assert fp.sum() < (hu & ~truth).sum()
    assert (fp & (p.labels == ph.TISSUES["effusion"])).sum() <= 0.003 * truth.sum()
    assert (lungs.right & p.masks["left_lung"]).sum() == 0 and (lungs.left & p.masks["right_lung"]).sum() == 0
    assert not (lungs.lungs & lungs.airways).any()
    assert any("lung network took" in n for n in lungs.notes), lungs.notes


def test_net_finds_no_lung_below_the_diaphragm(effusion_phantom):
    p = effusion_phantom
    truth = p.masks["right_lung"] | p.masks["left_lung"]
    below = ~truth.reshape(truth.shape[0], -1).any(axis=1)
    labels = segment_lungs(p.as_volume(), method="net").labels
    assert below.any() and not labels[below].any()


def test_the_network_runs_on_the_slices_with_aerated_lung_and_their_neighbours():
    from node.pipeline.lungs.net import lung_probability, lung_probability_near

    hu = torch.linspace(-1000.0, 100.0, 7 * 60 * 70).reshape(7, 60, 70).numpy()
    aerated = torch.zeros(7, 60, 70, dtype=torch.bool).numpy()
    aerated[3:5, 20:40, 20:40] = True
    prob = lung_probability_near(hu, aerated)
    assert not prob[:2].any() and not prob[6:].any()
    assert (prob[2:6] == lung_probability(hu[2:6])).all()


def test_the_network_started_before_the_aerated_lung_is_known_gives_the_same_probability():
    from node.pipeline.lungs.net import EarlyProbability, lung_probability_near

    hu = torch.linspace(-1000.0, 100.0, 8 * 60 * 70).reshape(8, 60, 70).numpy()
    air = torch.zeros(8, 60, 70, dtype=torch.bool).numpy()
    air[2:6, 10:50, 10:50] = True  # the body's air: lung, and bowel gas two slices lower
    aerated = torch.zeros_like(torch.from_numpy(air)).numpy()
    aerated[3:5, 20:40, 20:40] = True
    early = lung_probability_near(hu, aerated, started=EarlyProbability(hu, air))
    assert not early[:2].any() and not early[6:].any()  # the started slices beyond the aerated lung's are not used
    assert torch.allclose(torch.from_numpy(early), torch.from_numpy(lung_probability_near(hu, aerated)), atol=1e-6)
    lower = torch.zeros_like(torch.from_numpy(air)).numpy()
    lower[6, 20:40, 20:40] = True  # aerated lung beyond the started slices: computed for them
    late = lung_probability_near(hu, lower, started=EarlyProbability(hu, air))
    assert late[7].any() and torch.allclose(torch.from_numpy(late), torch.from_numpy(lung_probability_near(hu, lower)),
                                            atol=1e-6)


def test_the_early_network_skips_the_slices_below_the_lungs_once_they_are_known(monkeypatch):
    """A chest-abdomen series holds bowel gas far below the lungs: the early network stops at the lungs."""
    import threading

    import numpy as np

    from node.pipeline.lungs import net

    step = net.NET_THREAD_SLICES
    hu = np.repeat(np.arange(6 * step, dtype=np.float32)[:, None, None], 4, axis=1).repeat(4, axis=2)  # value = slice
    air = np.ones(hu.shape, bool)
    gate, computed = threading.Event(), []

    def fake(part, device="cpu"):
        gate.wait(5)  # the first batch waits until the lungs are known
        computed.extend(int(k) for k in part[:, 0, 0])
        return part / 100.0

    monkeypatch.setattr(net, "lung_probability", fake)
    early = net.EarlyProbability(hu, air)
    lungs = slice(step // 2, 2 * step + 3)  # the first three batches
    threading.Timer(0.2, gate.set).start()
    prob = early.probability(lungs)
    assert np.array_equal(prob[lungs], hu[lungs] / 100.0)
    assert not prob[:lungs.start].any() and not prob[lungs.stop:].any()  # slices computed beyond: 0
    assert max(computed) < 3 * step and len(computed) == len(set(computed))  # nothing below, nothing twice
    gate.clear()
    stopped = net.EarlyProbability(hu, air)
    stopped.stop()  # no aerated lung at all: nothing after the batch under way
    gate.set()
    stopped._future.result()
    assert stopped._done.sum() <= step


def test_a_lung_step_that_fails_leaves_no_network_running(monkeypatch, effusion_phantom):
    """The worker process ends when its job fails; a network thread still working through the volume would keep
    it alive (the interpreter waits for the thread) until every slice was done."""
    import threading

    import node.pipeline.lungs as lungs_pkg
    from node.pipeline.lungs import net

    started, calls, gate = [], [], threading.Event()

    class Recorded(net.EarlyProbability):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def fake(part, device="cpu"):
        gate.wait(5)  # the first batch is under way when the step fails
        calls.append(len(part))
        return part * 0.0

    def fails(*args, **kwargs):
        raise RuntimeError("a later step failed")

    monkeypatch.setattr(net, "lung_probability", fake)
    monkeypatch.setattr(lungs_pkg, "EarlyProbability", Recorded)
    monkeypatch.setattr(lungs_pkg, "find_airways", fails)
    threading.Timer(0.2, gate.set).start()
    with pytest.raises(RuntimeError, match="a later step failed"):
        segment_lungs(effusion_phantom.as_volume(), method="net")
    (early,) = started
    early._future.result(5)
    assert early._done.any() and not early._done.all()  # its shape has more slices than one batch
    assert len(calls) == 1


def test_real_ct_examples_label_aerated_lung_and_leave_the_chest_wall_out():
    """training.real_ct: the two real series without dense disease give examples whose lung label covers the
    aerated lung and none of the bone, muscle or fat around it (what the first network took for lung)."""
    from tests.support import SHARED_DATA, skip_or_fail
    from training import lungnet
    from training.real_ct import ABDOMEN_SERIES, CHEST_CROP, real_volumes

    if not (SHARED_DATA / ABDOMEN_SERIES).is_dir() or not (SHARED_DATA / CHEST_CROP).is_file():
        skip_or_fail(f"{SHARED_DATA / ABDOMEN_SERIES} or {SHARED_DATA / CHEST_CROP} is absent")
    volumes = real_volumes(SHARED_DATA)
    assert [v.hu.shape[0] for v in volumes] == [20, 112]
    for volume in volumes:
        hu, label = lungnet.real_examples(volume, 64)
        assert hu.shape == label.shape == (volume.hu.shape[0], 64, 64)
        lung = label >= 0.5
        assert lung.any(dim=(1, 2)).sum() >= 10  # lung on most slices with lung bases or around the heart
        assert float(hu[lung].median()) < -700.0  # aerated lung
        # above 0 HU only the vessels inside the lung (holes filled; contrast-enhanced in the crop): 2.2 % there
        assert float((lung & (hu > 0.0)).sum()) < 0.05 * float(lung.sum())


def test_dense_phantom_examples_keep_the_lung_label_with_denser_consolidation():
    """--dense-phantoms: a phantom example with airless consolidation has the same lung label as the default
    one, and its lung is denser (the consolidation at soft-tissue density)."""
    from node.phantom import DENSE_CONSOLIDATION_HU
    from training import lungnet

    seed, burden, effusion = lungnet.PHANTOMS[0]
    hu, label = lungnet.phantom_examples(seed, burden, effusion, 64)
    hu_dense, label_dense = lungnet.phantom_examples(seed, burden, effusion, 64, DENSE_CONSOLIDATION_HU)
    assert torch.equal(label, label_dense) and label.sum() > 0
    lung = label >= 0.5
    denser = hu_dense - hu  # the same noise: only the consolidation (and pixels resized with it) changes
    assert float(denser.min()) > -1.0 and float(denser[lung].max()) > 40.0
    assert float(denser[lung].mean()) > 10 * float(denser[~lung].mean())
    assert lungnet.dataset_path(lungnet.LungNetConfig(dense_phantoms=True, real=True)).name.endswith("-real-dense.pt")
