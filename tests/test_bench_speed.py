"""The lung-speed benchmark times the same work in both trees it compares."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("method", [None, "net", "hu"])
def test_the_lung_network_loads_before_the_clock_whatever_the_method(method, monkeypatch, tmp_path, capsys):
    """bench/lungs_speed.py runs the baseline tree with its default method (no ``--method``): the network must be
    loaded before the clock there too, or the baseline counts importing torch and the network against itself
    (the same code read 0.79 of itself)."""
    import bench.lungs_speed as speed
    import node.pipeline.lungs as lungs
    from node.pipeline.lungs import net

    events = []
    monkeypatch.setattr(net, "_lung_net", lambda device: events.append(("load", device)))
    monkeypatch.setattr(lungs, "segment_lungs",
                        lambda volume, **kwargs: events.append(("segment", kwargs)) or SimpleNamespace(
                            labels=np.zeros(volume.shape, np.uint8)))
    speed.child(8, tmp_path / "labels.npy", method)
    expected = {"method": method, "device": "cpu"} if method else {}
    assert events == [("load", "cpu"), ("segment", expected)]
    assert '"seconds"' in capsys.readouterr().out
