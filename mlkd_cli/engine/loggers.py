"""Where a run's metrics go besides its history files: `--log-to tensorboard,wandb,mlflow`.

History (`<name>_history.json/.csv`) is always written; each tracker asked for receives, on rank
0 only, the run's resolved configuration at the start, every epoch's row (the history's columns,
under the same keys in every tracker: `train/...`, `val/...`, `run/...`), the final figures at
the end, and how the run ended (finished, failed, killed). A new destination is one class with
`log_epoch`, `log_final` and `close`, and one entry in `LOGGERS`. The tracking libraries are
optional extras, imported only when a run uses them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol

from mlkd_cli.core.errors import RunInterrupted, UserError

FINISHED, FAILED, KILLED = "finished", "failed", "killed"
# MLflow refuses longer parameter values on some servers; a longer setting is cut (and marked).
MAX_PARAM_CHARS = 500
# MLflow takes at most 100 parameters and 1000 metrics in one request.
PARAMS_PER_BATCH = 100


class MetricLogger(Protocol):
    """One tracker of one run, on rank 0; built with `(output_dir, run_name, config)`."""

    where: str  # where it logs, as the run's one line about it says

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Record one epoch's metrics; `row["epoch"]` is the step."""

    def log_final(self, figures: dict[str, float], step: int) -> None:
        """Record the run's final figures (`final_figures`) once, at the end."""

    def close(self, outcome: str) -> None:
        """Flush and release the tracker, marking the run `finished`, `failed` or `killed`."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A row's finite numeric columns under their tracker keys (`epoch`, the step, left out)."""
    out = {}
    for key, value in row.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        out[_tag(key)] = value
    return out


def _tag(key: str) -> str:
    if key.startswith("val_") or key.endswith(("_top1", "_nll")):
        return f"val/{key.removeprefix('val_')}"
    if key in ("train_loss", "kd", "ce") or key.endswith("_loss"):
        return f"train/{key.removeprefix('train_')}"
    return f"run/{key}"


def final_figures(summary: dict[str, Any]) -> dict[str, float]:
    """What a run ends with: the best epoch and its validation figures (`best_val_top1`, ...)."""
    best = {f"best_{key}": value for key, value in (summary.get("best_row") or {}).items()}
    best.update(best_epoch=summary.get("best_epoch"), best_val_top1=summary.get("best_val_top1"))
    return {
        key: value
        for key, value in sorted(best.items())
        if (key == "best_epoch" or _tag(key.removeprefix("best_")).startswith("val/"))
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def log_final(loggers: list[MetricLogger], summary: dict[str, Any]) -> None:
    """Give every tracker the run's final figures, at its last epoch."""
    step = summary["last"]["epoch"] if summary.get("last") else 0
    for logger in loggers:
        logger.log_final(final_figures(summary), step)


def _param_key(key: str) -> str:
    """An MLflow parameter name: letters, digits and `_-. /` only, at most 250 characters."""
    return re.sub(r"[^\w\-. /]", "_", key)[:250]


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as `a.b` keys with string values, each cut to MAX_PARAM_CHARS."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_CHARS:
            text = text[: MAX_PARAM_CHARS - 3] + "..."
        flat[f"{prefix}{key}"] = text
    return flat


class TensorBoardLogger:
    """Scalars in `<output-dir>/<name>_tensorboard/`: losses by component, validation, speed;
    the configuration as a text summary, the final figures under `final/`."""

    requires = "tensorboard"

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = output_dir / f"{name}_tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.where = f"tensorboard: {self.log_dir}"
        text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # as code

    def log_epoch(self, row: dict[str, Any]) -> None:
        """One scalar per numeric column, grouped as train/, val/ and run/."""
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["epoch"])
        self.writer.flush()

    def log_final(self, figures: dict[str, float], step: int) -> None:
        """The final figures as `final/<name>` scalars at the last epoch."""
        for key, value in figures.items():
            self.writer.add_scalar(f"final/{key}", value, step)

    def close(self, outcome: str) -> None:
        """Close the event file (TensorBoard has no run status)."""
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run named as the run, its files in `<output-dir>/wandb/` unless
    WANDB_DIR says otherwise; WANDB_MODE, WANDB_PROJECT (default `mlkd`), WANDB_ENTITY and
    the rest of the user's WANDB_* settings apply as W&B reads them."""

    requires = "wandb"
    # Modes that never reach a server, so need no login.
    LOCAL_MODES: ClassVar[tuple[str, ...]] = ("offline", "disabled", "dryrun")

    @classmethod
    def check(cls) -> None:
        """Refuse at plan time an online run with no W&B credentials and no terminal to ask."""
        mode = os.environ.get("WANDB_MODE", "").lower()
        if mode in cls.LOCAL_MODES or os.environ.get("WANDB_DISABLED", "").lower() == "true":
            return
        if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
            return
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            if host.split("/")[0].split(":")[0] in netrc.read_text()[:1_000_000]:
                return
        import sys

        if not sys.stdin.isatty():
            raise UserError(
                "--log-to wandb: no W&B login found; run `wandb login`, set WANDB_API_KEY, "
                "or set WANDB_MODE=offline to keep the run on this machine"
            )

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        settings = {}
        if "WANDB_CONSOLE" not in os.environ:
            settings["console"] = "off"  # mlkd's progress bars; the history holds the numbers
        if "WANDB_SILENT" not in os.environ:
            settings["silent"] = True  # stdout stays mlkd's (--json prints only JSON there)
        folder = Path(os.environ.get("WANDB_DIR") or output_dir)
        folder.mkdir(parents=True, exist_ok=True)  # else W&B warns of a missing "git root"
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "mlkd"),
                name=name,
                dir=str(folder),
                config=config,
                settings=wandb.Settings(**settings),
            )
        except (wandb.errors.Error, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
            raise UserError(
                f"--log-to wandb could not start a run ({first}); check WANDB_* settings "
                "or set WANDB_MODE=offline"
            ) from None
        mode = self.run.settings.mode
        self.where = f"wandb ({mode}): project {self.run.project}, {Path(self.run.dir).parent}"

    def log_epoch(self, row: dict[str, Any]) -> None:
        """The row's scalars and the epoch at step = epoch."""
        self.run.log({"epoch": row["epoch"], **scalars(row)}, step=row["epoch"])

    def log_final(self, figures: dict[str, float], step: int) -> None:
        """The final figures into the run's summary."""
        self.run.summary.update(figures)

    def close(self, outcome: str) -> None:
        """Finish the run; W&B marks one with a non-zero exit code failed."""
        import wandb

        self.run.summary["outcome"] = outcome
        self.run.finish(exit_code={FINISHED: 0, FAILED: 1, KILLED: 130}[outcome])
        # finish() can return before W&B's service has written the run's last records (seen
        # offline: a run file of its header alone), and a worker process ends without W&B's
        # exit hook; shutting the service down waits for them. Not while another run is live.
        if wandb.run is None:
            wandb.teardown()


class MlflowLogger:
    """An MLflow run named as the run, in MLFLOW_TRACKING_URI's store, or by default in a local
    file store `<output-dir>/mlruns/`; experiment MLFLOW_EXPERIMENT_NAME (default `mlkd`)."""

    requires = "mlflow"

    def __init__(self, output_dir: Path, name: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.allowed_file_store = False
        self.default_store = not uri
        if not uri:
            # The local store mlflow-skinny can write is the file store, which MLflow 3 keeps
            # in maintenance mode and refuses unless allowed; mlkd allows it for its own default.
            uri = (output_dir / "mlruns").resolve().as_uri()
            self.allowed_file_store = "MLFLOW_ALLOW_FILE_STORE" not in os.environ
            if self.allowed_file_store:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        self.uri = uri
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "mlkd")
        try:
            self.client = MlflowClient(uri)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            tags = {"mlkd.output_dir": str(output_dir)}
            self.run_id = self.client.create_run(
                experiment_id, run_name=name, tags=tags
            ).info.run_id
        except MlflowException as exc:
            self._restore_env()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
            raise UserError(
                f"--log-to mlflow could not start a run in {uri[:100]} ({first}); check "
                "MLFLOW_TRACKING_URI"
            ) from None
        where = f"{uri[:100]} (MLFLOW_TRACKING_URI)"
        if self.default_store:
            where = f"local file store {output_dir / 'mlruns'} (MLFLOW_TRACKING_URI for another)"
        self.where = f"mlflow: experiment {experiment}, {where}"
        params = [Param(_param_key(k), v) for k, v in flat_config(config).items()]
        try:
            for start in range(0, len(params), PARAMS_PER_BATCH):
                batch = params[start : start + PARAMS_PER_BATCH]
                self.client.log_batch(self.run_id, params=batch)
        except BaseException:
            self.close(FAILED)
            raise

    def log_epoch(self, row: dict[str, Any]) -> None:
        """The row's scalars at step = epoch."""
        self._log(scalars(row), row["epoch"])

    def log_final(self, figures: dict[str, float], step: int) -> None:
        """The final figures as `final/<name>` metrics at the last epoch."""
        self._log({f"final/{k}": v for k, v in figures.items()}, step)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, outcome: str) -> None:
        """End the run as FINISHED, FAILED or KILLED."""
        try:
            self.client.set_terminated(self.run_id, outcome.upper())
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        if self.allowed_file_store:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
            self.allowed_file_store = False


LOGGERS: dict[str, type] = {
    "tensorboard": TensorBoardLogger,
    "wandb": WandbLogger,
    "mlflow": MlflowLogger,
}


def parse_log_to(text: str | None) -> list[str]:
    """`--log-to tensorboard,wandb,mlflow` (any subset) as names, each checked to exist, to be
    installed and (W&B) to be able to start, before any work."""
    if not text:
        return []
    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    for name in names:
        if name not in LOGGERS:
            shown = name if len(name) <= 100 else name[:97] + "..."
            raise UserError(f"--log-to {shown}: choose from {', '.join(sorted(LOGGERS))}")
        package = LOGGERS[name].requires
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"--log-to {name} needs the {package} package: pip install 'mlkd[{name}]'"
            )
        check = getattr(LOGGERS[name], "check", None)
        if check is not None:
            check()
    return names


def run_config(run_info: dict[str, Any], output_dir: Path, world_size: int) -> dict[str, Any]:
    """What trackers are told of a run at its start: the history's run record (settings,
    provenance, precision) with the model card cut to its headline, and where the files go."""
    card = run_info.get("model_card") or {}
    config = {k: v for k, v in run_info.items() if k != "model_card"}
    config["model"] = {k: card.get(k) for k in ("arch", "num_classes", "img_size")}
    return {**config, "output_dir": str(output_dir), "world_size": world_size}


@contextlib.contextmanager
def tracking(
    names: list[str],
    output_dir: Path,
    run_name: str,
    config: dict[str, Any],
    say: Callable[[str], None],
) -> Iterator[list[MetricLogger]]:
    """The trackers a run asked for (enter on rank 0 only), each said where it logs in one
    line, and closed however the run ends: finished, killed (a signal or Ctrl-C) or failed."""
    outcome = [FAILED]
    with contextlib.ExitStack() as closing:
        loggers: list[MetricLogger] = []
        for name in names:
            logger = LOGGERS[name](output_dir, run_name, config)
            closing.callback(lambda logger=logger: logger.close(outcome[0]))
            loggers.append(logger)
            say(f"tracking in {logger.where}")
        try:
            yield loggers
        except (KeyboardInterrupt, RunInterrupted):
            outcome[0] = KILLED
            raise
        outcome[0] = FINISHED
