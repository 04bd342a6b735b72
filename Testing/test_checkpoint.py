"""Checkpoints: one safetensors file with a model card; never unpickled; clear errors when broken."""
import copy
import json
import pickle

import pytest
import torch
from conftest import TINY_CARD
from safetensors.torch import save_file

from JointRegSegLib import CheckpointError, load_model, new_model, read_card, save_model
from JointRegSegLib.models.checkpoint import CARD_KEY


def test_round_trip_keeps_weights_and_card(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.card["labels"] == TINY_CARD["labels"]
    assert loaded.card["parameter_count"] == sum(p.numel() for p in tiny_model.network.parameters())
    for (name, a), (_, b) in zip(tiny_model.network.state_dict().items(), loaded.network.state_dict().items()):
        assert torch.equal(a, b), name
    assert read_card(path)["name"] == "tiny-test-model"


def test_pickle_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)
    torch_file = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(2)}, torch_file)
    with pytest.raises(CheckpointError, match="torch.save"):
        load_model(torch_file)


def test_truncated_file(tmp_checkpoint_bytes):
    path, data = tmp_checkpoint_bytes
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_tampered_weights(tmp_checkpoint_bytes):
    path, data = tmp_checkpoint_bytes
    tampered = bytearray(data)
    tampered[-10] ^= 0xFF
    path.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model(path)


def test_card_architecture_not_matching_weights(tmp_path, tiny_model):
    tensors = {k: v.contiguous() for k, v in tiny_model.network.state_dict().items()}
    card = copy.deepcopy(TINY_CARD)
    card["format"], card["format_version"] = "jointregseg-checkpoint", 1
    card["architecture"]["segmentation"]["channels"] = [4, 8, 8]
    path = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(path), metadata={CARD_KEY: json.dumps(card)})
    with pytest.raises(CheckpointError, match="does not match the stored weights"):
        load_model(path, trust_unsigned=True)


def test_missing_file_and_missing_card(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    path = tmp_path / "nocard.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="no JointRegSeg model card"):
        load_model(path)


def test_invalid_card_is_named(tmp_path):
    card = copy.deepcopy(TINY_CARD)
    card["labels"] = [{"value": 1, "name": "x", "color": [1, 0, 0]}]
    with pytest.raises(CheckpointError, match="include 0"):
        new_model(card)
    card = copy.deepcopy(TINY_CARD)
    card["working_grid"]["size"] = [47, 48, 48]
    with pytest.raises(CheckpointError, match="divisible"):
        new_model(card)


@pytest.fixture
def tmp_checkpoint_bytes(tmp_path, tiny_model):
    path = save_model(tiny_model, tmp_path / "m.safetensors")
    return path, path.read_bytes()
