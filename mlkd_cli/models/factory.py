"""Build any timm model by name, from scratch, timm's hub weights, or a local checkpoint."""

from __future__ import annotations

import difflib
import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import timm
import torch
from timm.layers import DropPath
from torch import nn

from mlkd_cli.core.checkpoint import EMA_KEY, EXITS_FORMAT, MODEL_FORMAT, ModelCard, read_weights
from mlkd_cli.core.errors import UserError

# How long `--pretrained` waits for the weights' host to answer before calling it unreachable.
CONNECT_TIMEOUT_S = 3.0
# Where these are set, the network is reached through a proxy, which a direct probe cannot test.
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)
# The files timm looks for in a Hugging Face hub repository, in its order.
HUB_WEIGHT_FILES = ["model.safetensors", "pytorch_model.bin"]


def check_model_name(arch: str) -> None:
    """Refuse a name timm does not know, suggesting the closest ones it does."""
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see `timm.list_models()` for names"
    raise UserError(f"unknown model {arch!r}; {hint}")


def build_model(
    arch: str,
    num_classes: int,
    pretrained: bool = False,
    init_checkpoint: Path | None = None,
    init_ema: bool = True,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """A timm model with a classifier for `num_classes`.

    `pretrained` downloads timm's weights; `init_checkpoint` loads local weights (a timm
    train.py checkpoint's EMA weights unless `init_ema` is False), keeping everything but a
    classifier whose shape does not fit (which is then freshly initialised). `drop_path_rate`
    is timm's stochastic depth (None: the architecture's default), refused in one line by an
    architecture that has none.
    """
    check_model_name(arch)
    if pretrained and init_checkpoint is not None:
        raise UserError("--pretrained and --init-checkpoint both give initial weights; pass one")
    # As timm's train.py: a rate left out is not passed, so the architecture's default applies.
    options = {} if drop_path_rate is None else {"drop_path_rate": drop_path_rate}
    try:
        if pretrained:
            return _with_drop_path(build_pretrained(arch, num_classes, **options), arch, options)
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **options)
    except TypeError as exc:
        if "drop_path_rate" not in str(exc):
            raise
        raise _no_drop_path(arch) from None
    if init_checkpoint is not None:
        load_backbone(model, init_checkpoint, init_ema)
    return _with_drop_path(model, arch, options)


def _no_drop_path(arch: str) -> UserError:
    return UserError(f"{arch} has no stochastic depth (drop path) to set: drop --drop-path")


def _with_drop_path(model: nn.Module, arch: str, options: dict[str, float]) -> nn.Module:
    """`model`, checked to hold the stochastic-depth layers a positive rate asked for (an
    architecture may take the argument and build none)."""
    if options.get("drop_path_rate", 0) > 0 and drop_path_rate_of(model) == 0:
        raise _no_drop_path(arch)
    return model


def drop_path_rate_of(model: nn.Module) -> float:
    """The highest rate of the model's stochastic-depth layers (timm's DropPath; 0: none)."""
    return max(
        (float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)), default=0.0
    )


def build_pretrained(arch: str, num_classes: int, **options: float) -> nn.Module:
    """`arch` with timm's pretrained weights: from the local cache when they are there, else
    downloaded, after one quick check that the host answers; offline, one line at once instead
    of minutes of the hub client's retries."""
    overlay = pretrained_source(arch)
    try:
        return timm.create_model(
            arch,
            pretrained=True,
            num_classes=num_classes,
            pretrained_cfg_overlay=overlay,
            **options,
        )
    except TypeError:
        raise  # a keyword the architecture does not take: the caller says which
    except Exception as exc:  # hub, network and cache errors have no common base class
        first_line = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
        raise UserError(
            f"could not fetch timm's pretrained weights for {arch} ({first_line}); "
            "check the network, or pass --init-checkpoint with local weights"
        ) from exc


def pretrained_source(arch: str) -> dict[str, str] | None:
    """Where `--pretrained` takes `arch`'s weights from: the local file (as a pretrained_cfg
    overlay), or None to download them; refused in one line when neither can be (checked in the
    plan, before any work, and again where the model is built)."""
    source = timm.models.get_pretrained_cfg(arch)
    if source is None or not (source.hf_hub_id or source.url):
        raise UserError(
            f"timm has no pretrained weights for {arch}; drop --pretrained, or pass "
            "--init-checkpoint with local weights"
        )
    cached = cached_weights(source)
    overlay = {"file": cached} if cached else None
    if cached is None:
        where = urlsplit(hf_endpoint() if source.hf_hub_id else source.url)
        host = where.hostname or ""
        if not host_answers(host, where.port or (80 if where.scheme == "http" else 443)):
            raise UserError(
                f"timm's pretrained weights for {arch} are not in the local cache and {host} "
                "cannot be reached (offline?); pass --init-checkpoint PATH with local weights "
                "(a .pth, .safetensors or timm checkpoint), or drop --pretrained"
            )
    return overlay


def cached_weights(source: timm.models.PretrainedCfg) -> str | None:
    """The local file of timm's weights for `source` (Hugging Face or torch hub cache), if any."""
    if source.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = source.hf_hub_id.partition("@")
        names = [source.hf_hub_filename] if source.hf_hub_filename else HUB_WEIGHT_FILES
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if source.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(source.url).path).name
        if local.is_file():
            return str(local)
    return None


def hf_endpoint() -> str:
    """The Hugging Face hub's address (HF_ENDPOINT may point elsewhere, e.g. a mirror)."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def host_answers(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether `host` accepts a connection on `port` within `timeout` seconds (name lookup
    included); False at once when HF_HUB_OFFLINE asks for no network, True without a probe
    when a proxy is set (only the proxy reaches the host; the hub client goes through it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    answered: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            answered.append(False)

    # The name lookup has no timeout of its own: a thread bounds it.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answered and answered[0])


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the model's classifier head(s), from timm's pretrained config."""
    names = model.pretrained_cfg.get("classifier") or "fc"
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{name}." for name in names)


def load_backbone(model: nn.Module, path: Path, ema: bool = True) -> None:
    """Load local weights into `model`, replacing a classifier of another class count."""
    weights, _ = read_weights(path, ema)
    own = model.state_dict()
    heads = classifier_prefixes(model)
    kept = {
        k: v
        for k, v in weights.items()
        if not (k.startswith(heads) and k in own and own[k].shape != v.shape)
    }
    mismatched = [k for k, v in kept.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in kept and not k.startswith(heads)]
    unexpected = [k for k in kept if k not in own]
    if mismatched or missing or unexpected:
        example = (mismatched or missing or unexpected)[0]
        raise UserError(
            f"{path} does not fit {type(model).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} "
            f"mis-shaped tensors, e.g. {example!r}); pass a checkpoint of the same --model"
        )
    with torch.no_grad():
        model.load_state_dict(kept, strict=False)


def load_trained_model(
    path: Path, arch: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, ModelCard | None]:
    """A trained classifier from an mlkd checkpoint, a plain state dict or a .safetensors file.

    mlkd checkpoints (and safetensors exported by mlkd) say what they are; for anything else
    `arch` and `num_classes` must be given.
    """
    weights, meta = read_weights(path)
    card = card_of(meta)
    arch = arch or (card.arch if card else None) or recorded_arch(meta)
    if arch is None:
        raise UserError(f"{path} does not record its architecture; pass --model and --num-classes")
    check_model_name(arch)
    if card is not None and card.arch != arch:
        raise UserError(f"{path} holds a {card.arch}, not a {arch}; drop --model or fix it")
    if card is not None and num_classes is not None and card.num_classes != num_classes:
        raise UserError(
            f"{path} has {card.num_classes} classes, not --num-classes {num_classes}; drop the flag"
        )
    classes = card.num_classes if card else num_classes
    if classes is None:
        raise UserError(f"{path} does not record its class count; pass --num-classes")
    model = timm.create_model(arch, num_classes=classes)
    heads = classifier_prefixes(model)
    for key, tensor in weights.items():
        if key.startswith(heads) and key.endswith("weight") and tensor.shape[0] != classes:
            raise UserError(
                f"{path} has a classifier for {tensor.shape[0]} classes, not {classes}; "
                "fix --num-classes"
            )
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise UserError(f"{path} does not fit {arch} ({detail}); check --model") from None
    return model, card


def recorded_arch(meta: dict) -> str | None:
    """The timm model name a checkpoint of timm's train.py records (its `arch` key), if any."""
    arch = meta.get("arch")
    return arch if isinstance(arch, str) and timm.is_model(arch) else None


def weights_note(path: Path, meta: dict, flag: str = "--no-teacher-ema") -> str | None:
    """Which weights of a checkpoint holding EMA weights were taken, in words; else None."""
    if not meta.get("has_ema"):
        return None
    if meta.get("weights_key") == EMA_KEY:
        return f"{path}: its EMA weights ({EMA_KEY}; {flag} takes the raw ones)"
    return f"{path}: its raw weights ({meta.get('weights_key')}), not its EMA ones"


def card_of(meta: dict) -> ModelCard | None:
    """The model card in a checkpoint's metadata (.pth dict or safetensors header), if any."""
    if meta.get("format") in (MODEL_FORMAT, EXITS_FORMAT):
        return ModelCard.from_checkpoint(meta)
    if isinstance(meta.get("mlkd"), str):  # safetensors metadata holds strings only
        try:
            return ModelCard(**json.loads(meta["mlkd"]))
        except (ValueError, TypeError):
            return None
    return None


def read_card(path: Path) -> ModelCard | None:
    """The model card of a checkpoint, a .safetensors file, an export folder or an ONNX export
    (None: it records none), read without building the model."""
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix.lower() == ".onnx" and path.is_file():
        return card_of(_onnx_metadata(path))
    return card_of(read_weights(path)[1])


def _onnx_metadata(path: Path) -> dict[str, str]:
    """An ONNX file's metadata entries (mlkd's exports carry the card there)."""
    try:
        import onnx
    except ImportError:
        raise UserError(f"reading {path} needs onnx: pip install 'mlkd[export]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's decode errors share no base class worth naming
        raise UserError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    return {entry.key: entry.value for entry in model.metadata_props}


def check_input_size(model: nn.Module, arch: str, img_size: int) -> None:
    """Refuse an image size the architecture cannot run (one dry forward of one image)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise UserError(
            f"{arch} cannot run on {img_size}x{img_size} images ({detail}); raise --img-size"
        ) from None
    finally:
        model.train(was_training)
