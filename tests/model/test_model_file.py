"""model.pt written and read back through esen_train.model.model_file, and the trainer's
`load_backbone` moving weights between models with and without direct heads."""
from __future__ import annotations

import torch

from esen_train.engine.trainer import load_backbone
from esen_train.model import ESEN
from esen_train.model.model_file import FORMAT_VERSION, MODEL_FILE, load_model, model_file_payload, read_model_file, write_model_file
from tests.evaluation_helpers import fresh_model


def test_a_written_model_file_reads_back_into_the_same_model(tmp_path):
    model = fresh_model(direct_forces=False, seed=3)
    payload = model_file_payload(model.config, model.state_dict(), None, "conservative", 7, {"loss": 1.5}, [13, 29])
    write_model_file(payload, tmp_path / MODEL_FILE)
    read = read_model_file(tmp_path / MODEL_FILE)
    assert read["format_version"] == FORMAT_VERSION and read["step"] == 7 and read["elements"] == [13, 29]
    loaded, info = load_model(tmp_path, dtype=torch.float64)
    assert info.elements == [13, 29] and not info.used_ema and info.metrics == {"loss": 1.5}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key].to(value.dtype), value), key


def test_elements_are_left_out_when_unknown_and_extra_fields_kept():
    model = fresh_model(direct_forces=False)
    payload = model_file_payload(model.config, model.state_dict(), None, "direct", 0, {}, imported_from={"file": "x"})
    assert "elements" not in payload and payload["imported_from"] == {"file": "x"}


def test_load_backbone_drops_direct_heads_the_model_lacks():
    direct = fresh_model(direct_forces=True, seed=1)
    conservative = fresh_model(direct_forces=False, seed=2)
    new_heads = load_backbone(conservative, {"model": direct.state_dict(), "ema": None})
    assert new_heads == []
    assert conservative.state_dict().keys() == ESEN.backbone_state_dict(direct.state_dict()).keys()
    for key, value in conservative.state_dict().items():
        assert torch.equal(value, direct.state_dict()[key]), key


def test_load_backbone_keeps_fresh_heads_the_checkpoint_lacks():
    conservative = fresh_model(direct_forces=False, seed=1)
    direct = fresh_model(direct_forces=True, seed=2)
    fresh_heads = {key: value.clone() for key, value in ESEN.direct_heads_state_dict(direct.state_dict()).items()}
    new_heads = load_backbone(direct, {"model": {}, "ema": conservative.state_dict()})
    assert new_heads == ["direct forces head", "direct stress head"]
    state = direct.state_dict()
    for key, value in fresh_heads.items():
        assert torch.equal(state[key], value), key
    for key, value in conservative.state_dict().items():
        assert torch.equal(state[key], value), key
