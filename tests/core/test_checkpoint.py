"""Files written and read back: an atomic write keeps the previous file, a checkpoint is read
without running code, a damaged one is a user error, DDP prefixes are stripped."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from mlkd_cli.core.atomic import WriteFailed, atomic_write
from mlkd_cli.core.checkpoint import load_checkpoint, read_weights
from mlkd_cli.core.errors import UserError


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    atomic_write(target, lambda h: h.write(b"old"))

    def broken(handle) -> None:
        handle.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteFailed, match="No space left on device.*previous file is intact"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_checkpoint_needing_code_to_unpickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "payload": Exploit()}, path, pickle_module=pickle)
    with pytest.raises(UserError, match="arbitrary code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_weights(path)


def test_read_weights_strips_ddp_prefixes(tmp_path: Path) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"module.fc.weight": torch.ones(2)}, path)
    weights, meta = read_weights(path)
    assert list(weights) == ["fc.weight"] and meta == {}
    assert math.isclose(float(weights["fc.weight"].sum()), 2.0)
