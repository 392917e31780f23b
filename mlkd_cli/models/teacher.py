"""The teacher: one timm model or a weighted ensemble of several, as one frozen module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import timm
import torch
import torch.nn.functional as F
from torch import nn

from mlkd_cli.core.checkpoint import MODEL_FORMAT, ModelCard, read_weights
from mlkd_cli.core.constants import DEFAULT_MEAN, DEFAULT_STD
from mlkd_cli.core.errors import UserError
from mlkd_cli.core.safeload import clip
from mlkd_cli.models.ensemble_config import EnsembleConfig, MemberSpec
from mlkd_cli.models.factory import check_model_name, recorded_arch, weights_note


@dataclass(frozen=True)
class InputSpec:
    """The size and normalisation a model's input is expected in."""

    img_size: int
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD

    @classmethod
    def of(cls, card: ModelCard | None, fallback: InputSpec) -> InputSpec:
        """A checkpoint's recorded input, or the fallback for checkpoints that record none."""
        if card is None:
            return fallback
        return cls(int(card.img_size), tuple(card.mean), tuple(card.std))


class InputAdapter(nn.Module):
    """Turns a batch prepared for one input spec into one for another, on the device.

    Resizes (bicubic, antialiased) when sizes differ and re-normalises when mean/std differ;
    an identity when the two agree.
    """

    def __init__(self, source: InputSpec, target: InputSpec) -> None:
        super().__init__()
        self.size = None if source.img_size == target.img_size else target.img_size
        self.renormalise = (source.mean, source.std) != (target.mean, target.std)
        # x_target = (x_source * s_std + s_mean - t_mean) / t_std = x_source * scale + shift
        s_mean, s_std = torch.tensor(source.mean), torch.tensor(source.std)
        t_mean, t_std = torch.tensor(target.mean), torch.tensor(target.std)
        self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer(
            "shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.size is not None:
            images = F.interpolate(
                images,
                size=(self.size, self.size),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        if self.renormalise:
            images = images * self.scale + self.shift
        return images


@dataclass
class LoadedMember:
    """A member's model with what its checkpoint said about it."""

    spec: MemberSpec
    arch: str
    model: nn.Module
    card: ModelCard | None
    note: str | None = None  # which weights of a checkpoint with EMA weights were taken


def load_member(spec: MemberSpec, num_classes: int | None) -> LoadedMember:
    """Build a member from its checkpoint, checking architecture and class count."""
    if not spec.checkpoint.is_file():
        raise UserError(
            f"teacher checkpoint {spec.checkpoint} does not exist; train it or fix the path"
        )
    weights, meta = read_weights(spec.checkpoint, spec.ema)
    card = ModelCard.from_checkpoint(meta) if meta.get("format") == MODEL_FORMAT else None
    arch = spec.model or (card.arch if card else None) or recorded_arch(meta)
    if arch is None:
        raise UserError(
            f"{spec.checkpoint} does not record its architecture; name it (--model NAME, or "
            "'model' in the ensemble file)"
        )
    check_model_name(arch)
    if card is not None and spec.model is not None and card.arch != spec.model:
        raise UserError(
            f"{spec.checkpoint} holds a {card.arch}, but the ensemble file says {spec.model}; "
            "fix the model name or the checkpoint"
        )
    classes = card.num_classes if card is not None else num_classes
    if classes is None:
        raise UserError(f"{spec.checkpoint} does not record its class count; pass --dataset")
    if num_classes is not None and classes != num_classes:
        raise UserError(
            f"{spec.checkpoint} predicts {classes} classes but the dataset has {num_classes}; "
            "use a teacher trained on this dataset"
        )
    model = timm.create_model(arch, num_classes=classes)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        shape_hint = " (wrong class count?)" if "size mismatch" in str(exc) else ""
        raise UserError(
            f"{spec.checkpoint} does not fit {arch}{shape_hint}: {detail}; check the member's model"
        ) from None
    member = LoadedMember(spec, arch, model, card, weights_note(spec.checkpoint, meta))
    check_finite_weights(member)
    return member


def check_finite_weights(member: LoadedMember) -> None:
    """Refuse a teacher with a NaN or infinite weight: every output it gives would be one, and
    a student (or a soft-label store) taught by it learns nothing."""
    state = member.model.state_dict()
    for name, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"teacher member {clip(member.spec.name)} ({clip(member.spec.checkpoint)}) has "
                f"non-finite values in {clip(name)}: retrain or fix that checkpoint, or leave it "
                "out of the ensemble"
            )


class TeacherEnsemble(nn.Module):
    """A frozen weighted ensemble (a single model is an ensemble of one).

    Output: `(sum_i w_i * logits_i / n) / temperature`, the original project's combination.
    Members stay in eval mode whatever `.train()` is called with and run under
    `torch.inference_mode` (in bf16 autocast when `bf16` is set); the weights are a buffer, so
    they move with `.to()`. The output is an ordinary tensor, usable in a student's loss.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float],
        adapters: Sequence[nn.Module] | None = None,
        temperature: float = 1.0,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(members) != len(weights) or not members:
            raise ValueError("an ensemble needs one weight per member and at least one member")
        self.members = nn.ModuleList(members)
        self.adapters = nn.ModuleList(adapters or [nn.Identity() for _ in members])
        self.register_buffer("weights", torch.tensor(list(weights), dtype=torch.float32))
        self.temperature = float(temperature)
        self.names = list(names or [f"member{i}" for i in range(len(members))])
        # bf16 autocast for the members (the engine sets it from --precision); off: fp32 even
        # inside the caller's autocast.
        self.bf16 = False
        for param in self.parameters():
            param.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> TeacherEnsemble:
        """Members are always in eval mode: a teacher's BatchNorm must not drift."""
        super().train(False)
        return self

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def member_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Each member's logits, stacked as (members, batch, classes), in fp32."""
        with torch.inference_mode(), self._autocast(images.device):
            outputs = [
                member(adapter(images)).float()
                for member, adapter in zip(self.members, self.adapters, strict=True)
            ]
            stacked = torch.stack(outputs)
        return stacked.clone()  # leave inference mode: a plain tensor for the caller's graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(images), self.weights, self.temperature)

    def logits_and_features(
        self, images: torch.Tensor, feature_indices: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A one-model teacher's logits (as `forward`) and its feature maps at the given
        feature_info positions, from one forward pass."""
        if len(self.members) != 1:
            raise ValueError("features come from a teacher of one model, not an ensemble")
        member, adapter = self.members[0], self.adapters[0]
        with torch.inference_mode(), self._autocast(images.device):
            final, maps = member.forward_intermediates(
                adapter(images), indices=list(feature_indices)
            )
            logits = member.forward_head(final).float()
        logits = combine_logits(logits.clone()[None], self.weights, self.temperature)
        return logits, [m.clone() for m in maps]


def combine_logits(
    member_logits: torch.Tensor, weights: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """`(sum_i w_i * logits_i / n) / temperature` for logits of shape (members, batch, classes)."""
    n = member_logits.shape[0]
    weighted = (weights.to(member_logits.dtype).view(n, 1, 1) * member_logits).sum(0) / n
    return weighted / temperature


def member_input(
    member: LoadedMember, seen: InputSpec, img_size: int | None = None
) -> tuple[InputSpec, str]:
    """The input a member is fed and why, in words: `img_size` (`--teacher-img-size`) first,
    then the ensemble file's `img_size`, then what its checkpoint records; a checkpoint that
    records nothing is fed what the caller's batches hold (`seen`), never a guessed size."""
    recorded = InputSpec.of(member.card, seen)
    if img_size is not None:
        return replace(recorded, img_size=img_size), "--teacher-img-size"
    if member.spec.img_size is not None:
        return replace(recorded, img_size=member.spec.img_size), "the ensemble file's img_size"
    if member.card is not None:
        return recorded, "recorded in its checkpoint"
    return seen, "its checkpoint records no input size; --teacher-img-size sets one"


def describe_input(member: LoadedMember, spec: InputSpec, why: str, seen: InputSpec) -> str:
    """One line: which input a member runs at, why, and any resize of the batches it gets."""
    resize = "" if spec.img_size == seen.img_size else f", resized from {seen.img_size} px"
    return f"teacher {member.spec.name} ({member.arch}): {spec.img_size} px input ({why}){resize}"


def input_lines(
    loaded: Sequence[LoadedMember], seen: InputSpec, img_size: int | None = None
) -> list[str]:
    """One line per member: the input `member_input` settles for it, why, and any resize of the
    batches (prepared for `seen`) it is given."""
    return [describe_input(m, *member_input(m, seen, img_size), seen) for m in loaded]


def input_sizes(
    loaded: Sequence[LoadedMember], seen: InputSpec, img_size: int | None = None
) -> list[int]:
    """The input size `member_input` settles for each member (as `input_lines` says it), for
    the records."""
    return [member_input(m, seen, img_size)[0].img_size for m in loaded]


def build_teacher(
    config: EnsembleConfig,
    num_classes: int | None,
    input_spec: InputSpec,
    img_size: int | None = None,
) -> tuple[TeacherEnsemble, list[LoadedMember]]:
    """Load every member and wrap them; batches arrive prepared for `input_spec`.

    Each member is fed the input `member_input` settles (`img_size`: `--teacher-img-size`), and
    gets an adapter that resizes or re-normalises when that differs from `input_spec`
    (`input_lines` says so in words). Returns the ensemble and the loaded members.
    """
    loaded = [load_member(spec, num_classes) for spec in config.members]
    adapters = [InputAdapter(input_spec, member_input(m, input_spec, img_size)[0]) for m in loaded]
    teacher = TeacherEnsemble(
        [m.model for m in loaded],
        config.weights,
        adapters,
        config.temperature,
        [m.spec.name for m in loaded],
    )
    return teacher, loaded
