"""The deploy-time classifier: early-exit inference with a distilled student, without the command
line.

    from mlkd_cli.anytime import AnytimeClassifier

    classifier = AnytimeClassifier.load("models/student_exits.pth")  # or its export folder
    result = classifier.predict(classifier.preprocess(images))  # PIL images, or a tensor
    result.names, result.labels  # each image's class name (the card's) and index
    result.exits, result.macs  # the exit each took, the MACs it cost

From the staged ONNX folder `mlkd export` writes (`<name>_exits_staged/`), onnxruntime runs the
student segment by segment and passes on only the images that have not exited, so the work done
is the cascade's, as in PyTorch's staged run.

Each image leaves at the first exit whose confidence under the exit rule (the top softmax
probability, the margin between the top two, or one minus the normalised entropy) reaches that
exit's threshold — the rule and thresholds `mlkd eval --split val --early-exit` chose and wrote
into the checkpoint, unless others are given; the rest of the batch runs on to the next stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mlkd_cli.anytime.costs import ExitCosts
from mlkd_cli.anytime.rules import EXIT_RULE, cascade_from_outputs, check_rule, check_thresholds
from mlkd_cli.anytime.staged import StagedStudent
from mlkd_cli.core.checkpoint import ModelCard
from mlkd_cli.core.cpus import INT8_TARGET_KEY, warn_int8_target
from mlkd_cli.core.errors import UserError
from mlkd_cli.data.transforms import ImageConfig, build_eval_transform
from mlkd_cli.export.session import open_session
from mlkd_cli.export.staged_onnx import StagedSessions, is_staged, read_manifest
from mlkd_cli.models.exits import ExitsCheckpoint, exits_header, load_exits_checkpoint


@dataclass(frozen=True)
class AnytimePrediction:
    """What the cascade decided for a batch."""

    labels: torch.Tensor  # (N,) predicted class indices
    probs: torch.Tensor  # (N, classes) softmax of the head each image left at
    exits: torch.Tensor  # (N,) the head taken: 0.. for the exits, `exit_count` for the final
    macs: torch.Tensor  # (N,) multiply-accumulates each image cost, at the training size
    names: tuple[str, ...] = ()  # (N,) the class name of each label, from the student's card

    @property
    def mean_macs(self) -> float:
        """Mean MACs per image of the batch."""
        return float(self.macs.double().mean())


class AnytimeClassifier:
    """A student with exits that stops early on the images it is sure of.

    From `<name>_exits.pth` or its safetensors export, PyTorch runs the backbone stage by stage
    and an image that leaves costs only what it ran. From the ONNX file `mlkd export` writes
    (fp32 or `--int8`), onnxruntime runs the graph, which computes every head for every image:
    the decisions, labels and counted MACs are the cascade's, its speed that of the whole graph.
    From the staged folder beside it (`<name>_exits_staged/`, or its `manifest.json`),
    onnxruntime runs one session per segment and only the images still in the cascade reach
    the next one: the work is the cascade's.
    An int8 file quantized for VNNI (`--int8-target vnni`), loaded on an x86 CPU without it,
    prints one warning line: such a CPU saturates its 8-bit weights.
    """

    def __init__(
        self,
        checkpoint: ExitsCheckpoint,
        thresholds: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        rule: str | None = None,
    ) -> None:
        self.checkpoint: ExitsCheckpoint | None = checkpoint
        self.device = torch.device(device)
        student = checkpoint.student.to(self.device).eval()
        self.staged: StagedStudent | None = StagedStudent(student, checkpoint.card.img_size)
        self.session = None
        self.segments: StagedSessions | None = None
        self._setup(checkpoint.card, checkpoint.exits, checkpoint.path, thresholds, rule)

    def _setup(
        self,
        card: ModelCard,
        exits: dict,
        path: Path,
        thresholds: Sequence[float] | None,
        rule: str | None,
    ) -> None:
        """What both backends share: rule, thresholds, MACs, classes and preprocessing."""
        chosen = exits.get("thresholds") or {}
        # Given thresholds go with the rule given (else the file's, else max_softmax).
        self.rule = check_rule(rule or chosen.get("rule", EXIT_RULE))
        values = thresholds if thresholds is not None else chosen.get("values")
        if values is None:
            raise UserError(
                f"{path} has no thresholds yet: run mlkd eval on it with --split val "
                "--early-exit, or pass thresholds"
            )
        self.thresholds = check_thresholds(values, len(exits["stages"]))
        if not exits.get("macs"):
            raise UserError(f"{path} has no MAC counts; it cannot stop early")
        self._macs = torch.tensor(ExitCosts.from_record(exits["macs"]).cascade, dtype=torch.long)
        self.card = card
        self.class_names = list(card.class_names)
        self.transform = build_eval_transform(
            ImageConfig(
                img_size=card.img_size,
                crop_pct=card.crop_pct,
                mean=tuple(card.mean),
                std=tuple(card.std),
                interpolation=card.interpolation,
            )
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        thresholds: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
        rule: str | None = None,
    ) -> AnytimeClassifier:
        """From `<name>_exits.pth`, the folder `mlkd export` writes from it, or its ONNX file
        (`<name>_exits.onnx`, `<name>_exits.int8.onnx`: run by onnxruntime on the CPU), or its
        staged folder (`<name>_exits_staged/` or its `manifest.json`: segment by segment)."""
        path = Path(path)
        if path.suffix == ".onnx":
            return cls._from_onnx(path, thresholds, rule)
        if is_staged(path):
            return cls._from_staged(path, thresholds, rule)
        return cls(load_exits_checkpoint(path), thresholds, device, rule)

    @classmethod
    def _from_onnx(
        cls, path: Path, thresholds: Sequence[float] | None, rule: str | None
    ) -> AnytimeClassifier:
        _need_onnxruntime(path)
        import onnx

        if not path.is_file():
            raise UserError(f"no file {path}")
        meta = {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
        card, exits = exits_header(meta, path)
        warn_int8_target(meta, path)  # an int8 file for a CPU this one is not: one line
        self = cls.__new__(cls)
        self.checkpoint, self.staged = None, None
        self.device = torch.device("cpu")
        self.session = open_session(path)
        self.segments = None
        self._setup(card, exits, path, thresholds, rule)
        return self

    @classmethod
    def _from_staged(
        cls, path: Path, thresholds: Sequence[float] | None, rule: str | None
    ) -> AnytimeClassifier:
        _need_onnxruntime(path)
        manifest = read_manifest(path)
        if manifest.int8_target is not None:  # an int8 folder for a CPU this one is not
            warn_int8_target({INT8_TARGET_KEY: manifest.int8_target}, manifest.folder)
        self = cls.__new__(cls)
        self.checkpoint, self.staged, self.session = None, None, None
        self.device = torch.device("cpu")
        self._setup(manifest.card, manifest.exits, manifest.folder, thresholds, rule)
        self.segments = StagedSessions(manifest)
        return self

    @property
    def exit_count(self) -> int:
        """Exits before the final head."""
        return len(self.thresholds)

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images to the normalised batch the student was trained on."""
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    def _cascade(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the head each image left at, and that head (exits 0.., final last)."""
        if self.staged is not None:
            return self.staged.cascade(images.to(self.device), self.thresholds, self.rule)
        if self.segments is not None:
            return self.segments.cascade(images, self.thresholds, self.rule)
        assert self.session is not None
        name = self.session.get_inputs()[0].name
        outputs = self.session.run(None, {name: images.float().cpu().numpy()})
        return cascade_from_outputs(
            [torch.from_numpy(o) for o in outputs], self.thresholds, self.rule
        )

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> AnytimePrediction:
        """Run the cascade on a preprocessed batch (N, 3, H, W)."""
        # On ONNX files onnxruntime does the work; the decision's few small torch ops then run on
        # one thread, else torch's thread pool wakes (softmax does, even on 64x10) and spins
        # against onnxruntime's threads: measured 2x slower per batch of 64 on a 2-core CPU.
        with _one_torch_thread(self.staged is None):
            logits, taken = self._cascade(images)
            probs = logits.softmax(dim=1)
        labels = probs.argmax(dim=1).cpu()
        return AnytimePrediction(
            labels=labels,
            probs=probs.cpu(),
            exits=taken.cpu(),
            macs=self._macs[taken.cpu()],
            names=tuple(self.class_names[i] for i in labels.tolist()),
        )


@contextmanager
def _one_torch_thread(active: bool) -> Iterator[None]:
    """torch on one thread in the block (when `active`), its setting restored after."""
    threads = torch.get_num_threads()
    if not active or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _need_onnxruntime(path: Path) -> None:
    """An ONNX export needs onnx and onnxruntime: say how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401  (here only to say what is missing)
    except ImportError:
        raise UserError(f"{path} needs onnx and onnxruntime: pip install 'mlkd[export]'") from None
