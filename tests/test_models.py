"""Networks: output shapes/counts, mode switch, coach mask fraction, shipped weights, engine mapping."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.coach import CoachNet, coach_mask  # noqa: E402
from models.factory import build_model  # noqa: E402
from models.infnet import OUTPUT_NAMES  # noqa: E402

pytestmark = pytest.mark.unit

torch.set_num_threads(1)
WEIGHTS = Path(__file__).resolve().parents[1] / "models" / "weights"


def test_models_import_without_dicom_stack():
    """models and training import on a bare machine (torch, numpy, pillow): block the DICOM stack and the
    optional helpers and import everything the GPU machine needs."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('pydicom','highdicom','pynetdicom','scipy','safetensors','tqdm'): sys.modules[m] = None\n"
            "import models, models.predict, models.registry, models.factory\n"
            "import training, training.loops, training.cli, training.schedule, training.metrics\n"
            "from training.loops import tqdm\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_models_import_nothing_of_the_node():
    """models/ is a torch layer: importing it and every module in it loads no module of ``node``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    modules = sorted(f"models.{p.stem}" for p in (root / "models").glob("*.py") if p.stem != "__init__")
    assert "models.predict" in modules and "models.registry" in modules
    code = (f"import sys\nimport models, {', '.join(modules)}\n"
            "node = sorted(m for m in sys.modules if m == 'node' or m.startswith('node.'))\n"
            "assert not node, node\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


@pytest.mark.parametrize("arch,size", [("infnet-res2net50", 64), ("infnet-compact", 64), ("infnet-compact", 96)])
def test_infnet_five_outputs(arch, size):
    m = build_model(arch).eval()
    with torch.no_grad():
        out = m(torch.randn(2, 1, size, size))
    assert len(out) == len(OUTPUT_NAMES) == 5
    for o in out:
        assert o.shape == (2, 1, size, size)
        assert torch.isfinite(o).all()


def test_reference_backbone_is_res2net50_26w4s():
    m = build_model("infnet-res2net50")
    b = m.backbone
    assert b.out_channels == (256, 512, 1024, 2048)
    assert [len(getattr(b, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    blk = b.layer1[0]
    assert blk.scale == 4 and blk.width == 26
    n = sum(p.numel() for n_, p in m.named_parameters() if not n_.startswith("inp_"))
    assert 25e6 < n < 40e6  # published Inf-Net (Res2Net-50): ~33 M parameters


def test_compact_is_small():
    m = build_model("infnet-compact")
    n = sum(p.numel() for n_, p in m.named_parameters() if not n_.startswith("inp_"))
    assert n * 2 < 10e6  # fp16 bytes


def test_inpaint_mode_shares_weights_and_swaps_heads():
    m = build_model("infnet-compact").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        seg = m(x)
        m.set_mode("inpaint")
        inp = m(x)
        m.set_mode("segment")
        seg2 = m(x)
    assert len(inp) == 5 and all(o.shape == (1, 1, 64, 64) for o in inp)
    assert not torch.allclose(seg[3], inp[3])
    assert torch.allclose(seg[3], seg2[3])
    # the inpainting heads are linear (plain conv, no BN)
    assert all(isinstance(h, torch.nn.Conv2d) for h in m.inp_heads.values())
    shared = [k for k in m.state_dict() if not k.startswith(("seg_heads", "inp_heads"))]
    assert len(shared) > 100


def test_reset_seg_heads_changes_only_heads():
    m = build_model("infnet-compact")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.reset_seg_heads()
    after = m.state_dict()
    changed = {k for k in before if k.endswith("weight") and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("seg_heads") for k in changed)


def test_multiclass_unet():
    m = build_model("multiclass-unet", {"base": 8}).eval()
    with torch.no_grad():
        y = m(torch.randn(2, 2, 64, 64))
        m.set_mode("inpaint")
        r = m(torch.randn(2, 2, 64, 64))
    assert y.shape == (2, 3, 64, 64)
    assert r.shape == (2, 1, 64, 64)


@pytest.mark.parametrize("keep", [0.75, 0.5])
@pytest.mark.parametrize("alpha", [1.0, 10.0])
def test_coach_mask_erases_requested_fraction(keep, alpha):
    torch.manual_seed(0)
    coach = CoachNet(keep=keep, alpha=alpha).eval()
    with torch.no_grad():
        m = coach(torch.randn(3, 1, 64, 64))
    assert m.shape == (3, 1, 64, 64)
    assert ((m >= 0) & (m <= 1)).all()  # scaled scores saturate the sigmoid to 0 and 1 in float32
    erased = (m < 0.5).float().mean(dim=(1, 2, 3))
    assert torch.allclose(erased, torch.full_like(erased, 1 - keep), atol=2 / 4096)


def test_coach_mask_formula():
    b = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    m = coach_mask(b, keep=0.75, alpha=1.0)
    # 12 kept (values 4..15), threshold between 3 and 4 -> 3.5
    assert torch.allclose(m, torch.sigmoid(b - 3.5))
    assert int((m < 0.5).sum()) == 4


def test_coach_erases_for_real_at_initialisation():
    """With the scores standardised and scaled (models.coach.SCORE_SCALE), alpha = 1 erases for real: measured
    0.17 of the pixels with M < 0.1 (of the requested 0.25) and 0.66 with M > 0.9 (docs/results.md); the raw
    scores of a fresh network leave every M between 0.1 and 0.9 (the ablation)."""
    from models.coach import SCORE_SCALE, erasure

    torch.manual_seed(0)
    x = torch.randn(8, 1, 160, 160)
    coach = CoachNet(keep=0.75, alpha=1.0).eval()
    assert coach.score_scale == SCORE_SCALE
    with torch.no_grad():
        scaled = erasure(coach(x))
        coach.score_scale = None
        raw = erasure(coach(x))
    assert 0.12 < scaled["erased"] <= 0.25 and scaled["kept"] > 0.6
    assert raw["erased"] < 0.01 and raw["kept"] < 0.01


def test_coach_gets_gradient():
    coach = CoachNet()
    x = torch.randn(2, 1, 32, 32)
    m = coach(x)
    (1 - (x * m).abs().mean()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in coach.parameters())


def _shipped():
    return sorted(p.stem for p in WEIGHTS.glob("*.json"))


def test_shipped_weights_load_and_hash():
    names = _shipped()
    if not names:
        pytest.skip("no weights shipped in models/weights yet")
    from models.registry import load_shipped

    total = sum(p.stat().st_size for p in WEIGHTS.iterdir() if p.is_file())
    assert total <= 20 * 2 ** 20
    for n in names:
        model, meta = load_shipped(n)
        assert meta["sha256"] and meta["arch"]
        c = 2 if meta["arch"] in ("multiclass-unet", "lungnet") else 1  # lungnet: two HU windows
        with torch.no_grad():
            out = model(torch.zeros(1, c, 64, 64))
        assert out is not None


def test_shipped_weights_give_the_documented_test_figures(shared_data):
    """The shipped fp16 files, run as the node's engine runs them (CPU fp32, flip TTA, the multi-class net on
    the binarised map), reproduce the test figures their sidecar documents (``python -m training
    shipped-metrics --write``), and docs/results.md quotes the same headline."""
    from models.registry import read_meta
    from training.loops import shipped_test_metrics

    torch.set_num_threads(2)
    report = shipped_test_metrics(str(shared_data / "covid-semiseg"), tta=True)
    documented = read_meta("infnet-compact")["test_engine_path"]
    assert report["n"] == documented["n"] == 48
    for section in ("single", "multi"):
        for key, fig in documented[section].items():
            assert report[section][key]["value"] == pytest.approx(fig["value"], abs=0.005), (section, key)
    assert (read_meta("infnet-compact")["inference"]["tta"] == "flips") is True  # the engine's default
    results = (Path(__file__).resolve().parents[1] / "docs" / "results.md").read_text()
    assert f"{documented['single']['mean_dice']['value']:.3f}" in results


def test_registry_rejects_bad_hash(tmp_path):
    from safetensors.torch import save_file

    from models.registry import WeightsIntegrityError, load_shipped

    m = build_model("infnet-compact")
    sd = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in m.state_dict().items()
          if not k.startswith("inp_")}
    save_file(sd, str(tmp_path / "x.safetensors"))
    meta = {"name": "x", "arch": "infnet-compact", "model_config": {}, "file": "x.safetensors", "sha256": "0" * 64}
    (tmp_path / "x.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        load_shipped("x", weights_dir=tmp_path)


# ----------------------------------------------------------------------------------------------- engine
class _BrightStub(torch.nn.Module):
    """Stand-in network: logit = 20 * (x - 1.85) on the normalised input: only the (brighter than body)
    synthetic lesion is 'infection', so boundary blending with the chest wall cannot trigger it."""

    def forward(self, x):
        y = 20 * (x[:, :1] - 1.85)
        return y, y, y, y, y


def _synthetic_volume():
    from node.pipeline.types import LungMasks, Volume

    s, r, c = 5, 120, 150
    hu = np.full((s, r, c), -1000.0, np.float32)          # air
    hu[:, 10:110, 10:140] = 40.0                         # body
    lab = np.zeros((s, r, c), np.uint8)
    lab[1:4, 25:95, 20:70] = 1                           # right lung
    lab[1:4, 30:90, 80:130] = 2                          # left lung
    hu[lab > 0] = -850.0
    lesion = np.zeros_like(lab, bool)
    lesion[2, 40:60, 30:50] = True                       # GGO-like lesion inside the right lung (bright: window top)
    hu[lesion] = 200.0
    vol = Volume(hu=hu, positions=np.zeros((s, 3)), orientation=np.array([1, 0, 0, 0, 1, 0.0]),
                 pixel_spacing=(0.7, 0.7), slice_spacing=1.0, sop_instance_uids=[str(i) for i in range(s)],
                 series_instance_uid="1", study_instance_uid="2")
    return vol, LungMasks(labels=lab), lesion


def test_engine_maps_back_to_source_grid():
    from node.pipeline.engines.infnet import InfNetEngine

    vol, lungs, lesion = _synthetic_volume()
    eng = InfNetEngine(model=_BrightStub(), meta={"name": "stub", "sha256": "", "arch": "stub"}, multiclass=None,
                       device="cpu", size=64, batch=2, window=(-600.0, 1500.0))
    res = eng.segment(vol, lungs)
    assert res.infection.shape == vol.shape and res.infection.dtype == bool
    assert res.probability.shape == vol.shape
    assert not (res.infection & ~lungs.lungs).any()          # only inside the lungs
    assert not res.infection[[0, 1, 3, 4]].any()              # only where the lesion is
    inter = (res.infection & lesion).sum()
    union = (res.infection | lesion).sum()
    assert inter / union > 0.85                               # same place after crop + resize + undo
    assert eng.identity.name == "infnet"


def test_engine_crop_paste_is_exact():
    """A model that says 'infection everywhere' must give exactly the lung mask back."""
    from node.pipeline.engines.infnet import InfNetEngine

    class _All(torch.nn.Module):
        def forward(self, x):
            y = torch.full_like(x[:, :1], 30.0)
            return y, y, y, y, y

    vol, lungs, _ = _synthetic_volume()
    res = InfNetEngine(model=_All(), meta={"name": "all"}, multiclass=None, device="cpu", size=32).segment(vol, lungs)
    assert np.array_equal(res.infection, lungs.lungs)


def test_engine_with_shipped_weights():
    if "infnet-compact" not in _shipped():
        pytest.skip("infnet-compact weights not shipped yet")
    from node.pipeline.engines.infnet import InfNetEngine

    vol, lungs, _ = _synthetic_volume()
    eng = InfNetEngine(device="cpu", size=64)
    p = eng.predictor
    assert p.multi is None or p.multi_size == p.multi_meta["input"]["size"] != 64  # each at its own size
    res = eng.segment(vol, lungs)
    assert res.infection.shape == vol.shape
    assert not (res.infection & ~lungs.lungs).any()
    assert len(eng.identity.weights_sha256) == 64
    assert eng.identity.device == "cpu float32"
    if res.ggo is not None:
        assert np.array_equal(res.ggo | res.consolidation, res.infection)
        assert not (res.ggo & res.consolidation).any()


def test_cpu_fallback_warns_once(monkeypatch):
    import logging

    import models.predict as predict
    from tests.util import captured_logs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(predict, "_warned_cpu", False)
    with captured_logs(logging.WARNING) as logs:
        assert predict.choose_device(None).type == "cpu"
        assert predict.choose_device("cuda").type == "cpu"
        assert predict.choose_device(None).type == "cpu"
    warnings = [r.getMessage() for r in logs.records if r.name == "models.predict"]
    assert len(warnings) == 1 and "(no CUDA GPU is available)" in warnings[0] and "processing.device" in warnings[0]
    monkeypatch.setattr(predict, "_warned_cpu", False)
    with captured_logs(logging.WARNING) as logs:
        assert predict.choose_device("cpu").type == "cpu"  # asked for: nothing to warn about
    assert not [r for r in logs.records if r.name == "models.predict"]


def test_cpu_fallback_names_cudas_reason(monkeypatch):
    """torch reports why CUDA failed to start as a warning (as under an address-space cap on an H200):
    the fallback's log line carries it, without torch's source location."""
    import logging
    import warnings

    import models.predict as predict
    from tests.util import captured_logs

    def unavailable() -> bool:
        warnings.warn("CUDA initialization: Unexpected error from cudaGetDeviceCount(). Error 2: out of memory "
                      "(Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:119.)", UserWarning)
        return False

    monkeypatch.setattr(torch.cuda, "is_available", unavailable)
    monkeypatch.setattr(predict, "_warned_cpu", False)
    with captured_logs(logging.WARNING) as logs:
        assert predict.choose_device("cuda").type == "cpu"
    [message] = [r.getMessage() for r in logs.records if r.name == "models.predict"]
    assert message.startswith('processing.device is "cuda" but CUDA cannot be used (CUDA initialization: '
                              "Unexpected error from cudaGetDeviceCount(). Error 2: out of memory): the Inf-Net")


def test_flip_tta_is_the_mean_over_the_four_flips():
    from models.tta import final_probability

    class Ramp(torch.nn.Module):  # not flip-equivariant: the logit grows along the columns and rows
        def forward(self, x):
            n, _, h, w = x.shape
            y = x + torch.arange(w).float() / w + torch.arange(h).float()[:, None] / (2 * h)
            return y, y, y, y, y

    x = torch.rand(2, 1, 5, 6)
    model = Ramp()
    plain = final_probability(model, x, tta=False)
    assert torch.allclose(plain, torch.sigmoid(model(x)[3]))
    expected = sum(torch.flip(torch.sigmoid(model(torch.flip(x, d) if d else x)[3]), d) if d else
                   torch.sigmoid(model(x)[3]) for d in ((), (-1,), (-2,), (-2, -1))) / 4
    assert torch.allclose(final_probability(model, x, tta=True), expected)
    assert not torch.allclose(expected, plain)


def test_engine_applies_the_tta_its_weights_were_chosen_with():
    from node.pipeline.engines.infnet import InfNetEngine

    engine = InfNetEngine(device="cpu")
    assert engine.predictor.tta and "flip TTA" in engine.identity.description
    assert not InfNetEngine(device="cpu", tta=False).predictor.tta
