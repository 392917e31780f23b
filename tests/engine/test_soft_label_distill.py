"""`mlkd distill --soft-labels STORE`: no teacher runs, every batch is the stored views and its
teacher outputs are the stored ones; resume is exact; a store that does not fit is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_error_line, assert_same_weights, invoke_cli, write_image_folder

from mlkd_cli.data.softlabels import open_store
from mlkd_cli.engine import distiller
from mlkd_cli.models.ensemble_config import EnsembleConfig, MemberSpec
from mlkd_cli.models.teacher import InputSpec, build_teacher

DATA = ("-d", "digits", "--img-size", "16")
STUDENT = ("--student", "test_resnet", "-b", "64", "-q")


def _store(teacher: Path, out: Path, *extra: object) -> Path:
    done = invoke_cli(
        "teacher", "label", *DATA, "-m", "test_resnet", "-c", teacher, "--views", "3",
        "--output", out, "-q", *extra,
    )  # fmt: skip
    assert done.exit_code == 0, done.stderr
    return out


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_every_batch_is_the_stored_views_with_their_stored_outputs(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline: str
) -> None:
    store = _store(digits_teacher, tmp_path / "store", "--data-pipeline", pipeline)
    config = EnsembleConfig(digits_teacher, (MemberSpec(digits_teacher, "test_resnet", 1.0),))
    live, _ = build_teacher(config, 10, InputSpec(16))
    seen: list[float] = []
    real = distiller.DistillTask.step

    def checked(self, model, images, targets, indices=None, mix=1.0):
        stored = self.source.logits(indices)
        with torch.inference_mode():
            now = live(images).float()
        # The stored top class is the live one, but for a near tie that float16 storage can flip.
        top = stored.argmax(1, keepdim=True)
        assert (now.gather(1, top).squeeze(1) >= now.max(1).values - 2e-2).all()
        seen.append((stored - now).abs().max().item())
        return real(self, model, images, targets, indices, mix)

    monkeypatch.setattr(distiller.DistillTask, "step", checked)
    result = invoke_cli(
        "distill", *DATA, "--soft-labels", store, *STUDENT, "-e", "2", "-n", "s",
        "--data-pipeline", pipeline, "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(seen) == 2 * (1_294 // 64) and max(seen) < 2e-2  # float16 storage of logits
    rows = json.loads((tmp_path / "out" / "s_history.json").read_text())["epochs"]
    assert rows[-1]["kd"] > 0


@pytest.mark.parametrize("loss", ["kd", "dist"])
def test_mixup_and_cutmix_from_a_store_blend_the_two_views_stored_outputs(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loss: str
) -> None:
    """Every mixed batch's teacher target is λ·p(own view) + (1 − λ)·p(partner's view) at the
    temperature the loss reads the teacher at (DIST: its τ), with the images' own λ."""
    store = _store(digits_teacher, tmp_path / "store")
    real, shares = distiller.DistillTask.step, []

    def checked(self, model, images, targets, indices=None, mix=1.0):
        stored, seen = self.source.logits(indices), {}
        named = self.loss.named

        def capture(outputs, teacher_logits, *rest):
            seen["teacher"] = teacher_logits
            return named(outputs, teacher_logits, *rest)

        self.loss.named = capture
        try:
            out = real(self, model, images, targets, indices, mix)
        finally:
            del self.loss.named
        t = self.loss.teacher_temperature
        p = torch.softmax(stored / t, dim=1)
        got = torch.softmax(seen["teacher"].float() / t, dim=1)
        assert torch.allclose(got, mix * p + (1 - mix) * p.flip(0), atol=1e-5)
        shares.append(mix)
        return out

    monkeypatch.setattr(distiller.DistillTask, "step", checked)
    result = invoke_cli(
        "distill", *DATA, "--soft-labels", store, *STUDENT, "-e", "1", "-n", "s", "--loss", loss,
        "--mixup-alpha", "1", "--cutmix-alpha", "1", "--output-dir", tmp_path / "out",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(shares) == 1_294 // 64 and sum(0 < m < 1 for m in shares) >= len(shares) - 1


def test_a_run_from_a_store_resumes_mid_epoch_to_the_same_weights(
    digits_teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _store(digits_teacher, tmp_path / "store")
    # With Mixup/CutMix, whose draws (λ, boxes) a resumed run must take alike too.
    mixing = ("--mixup-alpha", "0.5", "--cutmix-alpha", "1")
    run = ("distill", *DATA, "--soft-labels", store, *STUDENT, "-e", "2", *mixing)
    whole = invoke_cli(
        *run, "-n", "s", "--output-dir", tmp_path / "whole", "--save-every-steps", "5"
    )
    assert whole.exit_code == 0, whole.stderr
    real, calls = distiller.DistillTask.step, []

    def stopped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 27:  # in the second epoch (20 steps each)
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(distiller.DistillTask, "step", stopped)
    out = tmp_path / "parts"
    cut = invoke_cli(*run, "-n", "s", "--output-dir", out, "--save-every-steps", "5")
    assert cut.exit_code == 130
    monkeypatch.setattr(distiller.DistillTask, "step", real)
    resumed = invoke_cli(
        *run, "-n", "s", "--output-dir", out, "--save-every-steps", "5", "--resume"
    )
    assert resumed.exit_code == 0, resumed.stderr
    assert_same_weights(tmp_path / "whole" / "s.pth", out / "s.pth", "state_dict")


def test_a_store_that_does_not_fit_the_run_is_refused_before_any_training(
    digits_teacher: Path, tmp_path: Path
) -> None:
    store = _store(digits_teacher, tmp_path / "store")
    out = tmp_path / "out"
    run = ("distill", "-d", "digits", "--soft-labels", store, *STUDENT, "--output-dir", out)
    cases = [
        (["--img-size", "24"], "labelled for img_size 16, and this run has img_size 24"),
        (["--img-size", "16", "--hflip", "0.5"], "labelled for recipe"),
        (["--img-size", "16", "-m", "test_resnet", "-c", digits_teacher], "replaces the teacher"),
        (["--img-size", "16", "--loss", "kd+feature"], "needs the teacher's features"),
    ]
    folder = write_image_folder(tmp_path / "pets", {"train": 20, "val": 4})
    other = ("distill", "-d", "imagefolder", "--data-dir", folder, "--img-size", "16")
    result = invoke_cli(*other, "--soft-labels", store, *STUDENT, "--output-dir", out)
    assert result.exit_code == 2
    assert_error_line(
        result.stderr, "labelled for dataset digits, and this run has dataset imagefolder"
    )
    for extra, fragment in cases:
        result = invoke_cli(*run, *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert_error_line(result.stderr, fragment)
    shard = store / "shard-00001.logits.npy"
    content = bytearray(shard.read_bytes())
    content[-1] ^= 0x01
    shard.write_bytes(bytes(content))
    damaged = invoke_cli(*run, "--img-size", "16")
    assert damaged.exit_code == 2
    assert_error_line(damaged.stderr, "shard 1 is damaged", "relabel it")
    assert not out.exists()


def _swap_shards(store: Path, a: int, b: int) -> None:
    for suffix in (".logits.npy", ".classes.npy", ".json"):
        one, two = store / f"shard-{a:05d}{suffix}", store / f"shard-{b:05d}{suffix}"
        held = one.read_bytes()
        one.write_bytes(two.read_bytes())
        two.write_bytes(held)


def test_a_tampered_store_is_refused_before_any_training(
    digits_teacher: Path, tmp_path: Path
) -> None:
    """Two whole shards swapped, the manifest's seed edited 0 -> 7, a shard_size of 0: one line
    each, exit 2, nothing trained, and the labelling, run again, refuses to resume into it; put
    back, the store is accepted again."""
    label = ("--shard-size", "500")
    store = _store(digits_teacher, tmp_path / "store", *label)
    out = tmp_path / "out"
    run = ("distill", *DATA, "--soft-labels", store, *STUDENT, "--output-dir", out, "-e", "1")
    relabel = ("teacher", "label", *DATA, "-m", "test_resnet", "-c", digits_teacher, "--views",
               "3", "--output", store, "-q", *label)  # fmt: skip
    manifest = store / "manifest.json"
    original = manifest.read_text()
    swapped = "shard 0 (positions 0:500) holds shard 1's labels"
    edits = [
        (lambda: _swap_shards(store, 0, 1), swapped, swapped),
        (lambda: manifest.write_text(original.replace('"seed": 0', '"seed": 7')),
         "shard 0 was labelled under another manifest.json", "other settings (seed 7, not 0)"),
        (lambda: manifest.write_text(original.replace('"shard_size": 500', '"shard_size": 0')),
         "records shard_size 0, not a whole number of at least 1", "records shard_size 0"),
    ]  # fmt: skip
    for edit, fragment, label_fragment in edits:
        edit()
        for command, said in ((run, fragment), (relabel, label_fragment)):
            result = invoke_cli(*command)
            assert result.exit_code == 2, (said, result.stderr)
            assert_error_line(result.stderr, said)
        assert not out.exists()
        manifest.write_text(original)
        if fragment == swapped:
            _swap_shards(store, 0, 1)
    assert open_store(store, {"dataset": "digits"}).manifest.seed == 0  # sound again
