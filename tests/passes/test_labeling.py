"""`mlkd teacher label`: the stored outputs are the teacher's on exactly the views a student
replays, in the CPU and the device pipeline, shard by shard, on one process or two."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_error_line, invoke_cli, working_dir

from mlkd_cli.core.errors import UserError
from mlkd_cli.data.device import DeviceAugment
from mlkd_cli.data.loaders import TransformedSubset
from mlkd_cli.data.registry import load_splits
from mlkd_cli.data.softlabels import open_store, read_manifest
from mlkd_cli.data.transforms import ImageConfig, build_train_transform
from mlkd_cli.data.views import view_draws, view_seed
from mlkd_cli.models.ensemble_config import EnsembleConfig, MemberSpec
from mlkd_cli.models.teacher import InputSpec, build_teacher

LABEL = ("teacher", "label", "-d", "digits", "-m", "test_resnet", "--img-size", "16")


def _label(teacher: Path, out: Path, *extra: object):
    return invoke_cli(*LABEL, "-c", teacher, "--output", out, "--shard-size", "500", "-q",
                      "--json", *extra)  # fmt: skip


def _image_config(store: Path) -> ImageConfig:
    fields = dict(read_manifest(store).recipe)
    fields.pop("pipeline"), fields.pop("augment")
    tuples = ("mean", "std", "crop_scale", "crop_ratio")
    return ImageConfig(**{k: tuple(v) if k in tuples else v for k, v in fields.items()})


def _teacher(checkpoint: Path, image_config: ImageConfig):
    config = EnsembleConfig(path=checkpoint, members=(MemberSpec(checkpoint, "test_resnet", 1.0),))
    teacher, _ = build_teacher(
        config, 10, InputSpec(image_config.img_size, image_config.mean, image_config.std)
    )
    return teacher


@pytest.mark.parametrize("pipeline", ["cpu", "device"])
def test_the_store_holds_the_teachers_outputs_on_the_views_a_student_replays(
    digits_teacher: Path, tmp_path: Path, pipeline: str
) -> None:
    store = tmp_path / "store"
    done = _label(digits_teacher, store, "--views", "3", "--data-pipeline", pipeline)
    assert done.exit_code == 0, done.stderr
    summary = json.loads(done.stdout)
    manifest = read_manifest(store)
    assert manifest.recipe["pipeline"] == pipeline and manifest.top_k == 10  # 10 classes: all
    assert summary["shards"] == manifest.shard_count == 3 and summary["skipped"] == 0
    labelled = open_store(store, {"dataset": "digits", "images": manifest.images})
    # Replay some views by hand, as distillation will make them, and run the teacher on them.
    image_config = _image_config(store)
    splits = load_splits("digits", Path("data"))
    teacher = _teacher(digits_teacher, image_config)
    positions, views = torch.tensor([0, 501, 1000, manifest.images - 1]), torch.tensor([0, 2, 1, 2])
    pairs = list(zip(positions.tolist(), views.tolist(), strict=True))
    if pipeline == "cpu":
        subset = TransformedSubset(
            splits.train, splits.train_indices, build_train_transform(image_config)
        )
        images = torch.stack([subset[(p, view_seed(manifest.seed, v))][0] for p, v in pairs])
    else:
        chosen = np.asarray(splits.train_indices, dtype=np.int64)[positions.numpy()]
        raw = torch.from_numpy(splits.train.images[chosen]).permute(0, 3, 1, 2).contiguous()
        draws = torch.stack([view_draws(manifest.seed, v, manifest.images)[p] for p, v in pairs])
        images = DeviceAugment(image_config, torch.device("cpu"))(raw, None, draws)
    with torch.inference_mode():
        expected = teacher(images).float()
    all_logits, all_classes = labelled.tables()
    logits = all_logits[positions, views].float()
    classes = all_classes[positions, views].long()
    assert torch.equal(classes[:, 0], expected.argmax(1))
    gathered = expected.gather(1, classes)
    assert torch.allclose(logits, gathered, rtol=2e-3, atol=2e-3)  # float16 storage
    assert torch.equal(classes.sort(1).values, torch.arange(10).expand(4, 10))


def test_a_stopped_labelling_redoes_only_its_missing_shards_and_two_processes_agree(
    digits_teacher: Path, tmp_path: Path
) -> None:
    one = tmp_path / "one"
    assert _label(digits_teacher, one, "--views", "2").exit_code == 0
    before = {p.name: p.read_bytes() for p in one.glob("shard-*.npy")}
    (one / "shard-00001.json").unlink()  # as if stopped while writing shard 1
    (one / "shard-00001.logits.npy").unlink()
    again = _label(digits_teacher, one, "--views", "2")
    assert again.exit_code == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["labelled_here"], summary["skipped"]) == (1, 2)
    assert {p.name: p.read_bytes() for p in one.glob("shard-*.npy")} == before
    two = tmp_path / "two"
    split = _label(digits_teacher, two, "--views", "2", "--world-size", "2")
    assert split.exit_code == 0, split.stderr
    assert {p.name: p.read_bytes() for p in two.glob("shard-*.npy")} == before
    assert (two / "manifest.json").read_text() == (one / "manifest.json").read_text()


def test_labelling_refusals_are_one_line_and_write_nothing(
    digits_teacher: Path, tmp_path: Path
) -> None:
    out = tmp_path / "store"
    cases = [
        (["--views", "4", "--no-augment"], "--no-augment makes every view the same", "--views 1"),
        (["--top-k", "11"], "--top-k must be between 1 and the 10 classes"),
        (["--views", "0"], "--views must be from 1 to 1000, got 0"),
        (["--shard-size", "0", "--views", "2"], "--shard-size must be at least 1, got 0"),
    ]
    for extra, *fragments in cases:
        result = _label(digits_teacher, out, *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert_error_line(result.stderr, *fragments)
    assert not out.exists()
    assert _label(digits_teacher, out, "--views", "1").exit_code == 0
    other = _label(digits_teacher, out, "--views", "2")
    assert other.exit_code == 2
    assert_error_line(other.stderr, "made with other settings (views 1, not 2)", "--output")
    # The teachers' input size is part of the store: another one is another store.
    resized = _label(digits_teacher, out, "--views", "1", "--teacher-img-size", "24")
    assert resized.exit_code == 2
    assert_error_line(resized.stderr, "made with other settings (teacher", "--output")
    assert read_manifest(out).teacher["img_size"] == [16]


def test_with_no_teacher_named_the_config_json_here_is_the_teacher(tmp_path: Path) -> None:
    """The original project's habit: no `--ensemble` and no `--checkpoint` reads `config.json`
    in the working folder; without one, one line names both ways to name a teacher."""
    args = ("teacher", "label", "-d", "digits", "--img-size", "16", "--output", "store", "-q")
    with working_dir(tmp_path):
        alone = invoke_cli(*args)
        assert alone.exit_code == 2
        assert_error_line(alone.stderr, "no config.json here", "--ensemble FILE", "--checkpoint")
        member = {"checkpoint": "nowhere.pth", "model": "test_resnet"}
        Path("config.json").write_text(json.dumps({"members": [member]}))
        read = invoke_cli(*args)
    assert read.exit_code == 2  # its member is what is missing now: the file was read
    assert_error_line(read.stderr, "teacher checkpoint nowhere.pth does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing written


def test_a_teacher_with_a_nan_weight_is_refused_naming_it_before_any_work(
    digits_teacher: Path, tmp_path: Path
) -> None:
    content = torch.load(digits_teacher, weights_only=True)
    weights = content["state_dict"]
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.dim() == 4)
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    broken = tmp_path / "broken.pth"
    torch.save(content, broken)
    out = tmp_path / "store"
    result = _label(broken, out, "--views", "1")
    assert result.exit_code == 2, result.stderr
    assert_error_line(result.stderr, "teacher member broken (", f"non-finite values in {name}")
    assert not out.exists()  # refused in the plan, before the store is started


def test_only_the_members_whose_output_is_not_finite_are_named(tmp_path: Path) -> None:
    """In an ensemble, the member at fault is named; finite members whose combined logits leave
    float16's range (what the store keeps) are refused as such."""
    from mlkd_cli.data.softlabels import StoreManifest
    from mlkd_cli.engine.precision import Precision
    from mlkd_cli.models.teacher import TeacherEnsemble
    from mlkd_cli.passes.labeling import _label_shard

    def member(scale: float) -> torch.nn.Module:
        layer = torch.nn.Linear(12, 10)
        torch.nn.init.constant_(layer.weight, scale)
        return torch.nn.Sequential(torch.nn.Flatten(), layer)

    manifest = StoreManifest("digits", "train", 4, tuple("0123456789"), 2, {}, {}, 1, 10, 0, 4)
    precision = Precision.resolve("fp32", torch.device("cpu"))
    images = torch.ones(4, 3, 2, 2)

    def label(*scales: float):
        names = [f"m{i}" for i in range(len(scales))]
        teacher = TeacherEnsemble([member(s) for s in scales], [1.0] * len(scales), names=names)
        batches = iter([(images, torch.arange(4), torch.zeros(4, dtype=torch.long))])
        return _label_shard(manifest, teacher, precision, batches, 0, 4)

    logits, classes = label(0.1, 0.2)
    assert np.isfinite(logits).all() and (classes >= 0).all()
    with pytest.raises(UserError, match=r"not finite on training images 0:4 \(member m1, m2:"):
        label(0.1, float("nan"), float("inf"))
    with pytest.raises(UserError, match=r"exceed float16's range \(±65504\)"):
        label(1e5, 1e5)
