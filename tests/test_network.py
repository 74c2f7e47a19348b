"""Network shapes, the decimal head's locality, checkpoints (safetensors + JSON, never pickle)."""

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_meta, save_checkpoint
from model.config import CONFIGS, get_config
from model.network import HIHNet, argmax_2d, count_parameters


def test_paper_configuration_is_named():
    b = CONFIGS["hih_b"]
    assert (b.num_stacks, b.channels, b.input_size, b.heatmap_size, b.decimal_size) == (4, 256, 256, 64, 8)
    with pytest.raises(ValueError, match="unknown config"):
        get_config("hih_huge")


@pytest.mark.parametrize("name", ["hih_tiny", "hih_cpu"])
def test_output_shapes(name):
    torch.manual_seed(0)
    cfg = get_config(name)
    net = HIHNet(cfg).eval()
    x = torch.randn(2, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        out = net(x)
    H, D = cfg.heatmap_size, cfg.decimal_size
    assert len(out["integer"]) == cfg.num_stacks
    assert all(h.shape == (2, 68, H, H) for h in out["integer"])
    assert out["decimal"].shape == (2, 68, D, D)
    assert torch.equal(out["centers"], argmax_2d(out["integer"][-1]))


def test_decimal_head_reads_only_the_window_around_its_centre():
    torch.manual_seed(0)
    cfg = get_config("hih_tiny")
    net = HIHNet(cfg).eval()
    feats = torch.randn(1, cfg.channels, 16, 16)
    heat = torch.randn(1, 68, 16, 16)
    centres = torch.full((1, 68, 2), 8, dtype=torch.long)
    a = net.decimal(feats, heat, centres)
    feats2, heat2 = feats.clone(), heat.clone()
    feats2[..., 0:3, 0:3] += 5.0  # far from (8, 8): outside the 5x5 window
    heat2[..., 0:3, 0:3] += 5.0
    assert torch.allclose(a, net.decimal(feats2, heat2, centres))
    feats2[..., 8, 9] += 5.0  # inside
    assert not torch.allclose(a, net.decimal(feats2, heat2, centres))


def test_checkpoint_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    net = HIHNet(get_config("hih_tiny")).eval()
    path = save_checkpoint(tmp_path / "ck", net, {"scheme": "300w_68", "version": "v-test"})
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors"]
    loaded, meta = load_checkpoint(path, scheme="300w_68")
    assert meta["version"] == "v-test" and meta["config"]["channels"] == 32
    for (k, v), (k2, v2) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert count_parameters(loaded) == count_parameters(net)
    with pytest.raises(CheckpointError, match="300w_68 model, expected wflw_98"):
        load_checkpoint(path, scheme="wflw_98")  # a checkpoint of another scheme is refused
    # overwriting is atomic: the folder is replaced whole
    save_checkpoint(path, net, {"scheme": "300w_68", "version": "v2"})
    assert read_meta(path)["version"] == "v2"
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(tmp_path)
    (path / "meta.json").write_text(json.dumps({"format": "torch-pickle"}))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)
    bad = save_checkpoint(tmp_path / "bad", net, {"scheme": "300w_68"})
    (bad / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot load weights"):
        load_checkpoint(bad)
