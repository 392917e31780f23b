"""`--log-to tensorboard,wandb,mlflow`: each tracker read back with its own library, no network.

One tiny training run (two processes, so only rank 0 may log) feeds all three trackers; the slow
tests read W&B's offline run file, MLflow's local file store and TensorBoard's event file and
compare them with the run's own history. The refusals are checked before any training; how a run
that ends early closes its trackers, with the trackers alone.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_error_line, invoke_cli

from mlkd_cli.core.errors import RunInterrupted

NAME = "tracked"
TRAIN = (
    "teacher", "train", "-d", "digits", "-m", "test_resnet", "--img-size", "16", "-e", "2",
    "-n", NAME, "--seed", "3", "--label-fraction", "0.25",
)  # fmt: skip


def _quiet_tracking_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    """W&B offline, nothing sent anywhere, and the libraries' own caches and logs (wandb's
    services write theirs under ~/.cache/wandb) kept in `home`."""
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        mp.delenv(name, raising=False)
    config = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    mp.setenv("MPLCONFIGDIR", os.environ.get("MPLCONFIGDIR", str(config / "matplotlib")))
    mp.setenv("HOME", str(home))
    mp.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-epoch run at --world-size 2 logging to all three trackers: its folder, printed
    JSON summary and history rows."""
    folder = tmp_path_factory.mktemp("tracked")
    out = folder / "models"
    with pytest.MonkeyPatch.context() as mp:
        _quiet_tracking_env(mp, folder)
        result = invoke_cli(
            *TRAIN, "--world-size", "2", "--output-dir", out,
            "--log-to", "tensorboard,wandb,mlflow", "--json",
        )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    with (out / f"{NAME}_history.csv").open() as f:
        rows = list(csv.DictReader(f))
    # --json: stdout stays one JSON document however chatty a tracker library is.
    return {"out": out, "summary": json.loads(result.stdout), "rows": rows}


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(row[key]) for row in rows]


# ------------------------------------------------------------------------------------- readers


def _mlflow_run(out: Path, mp: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """The one run in the output folder's MLflow file store, and a client over it."""
    from mlflow.tracking import MlflowClient

    mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((out / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("mlkd")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one run, from rank 0 only"
    return client, runs[0]


def _mlflow_series(client: Any, run_id: str, key: str) -> list[float]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.value for m in history]


BLOCK, HEADER, RECORD_HEADER = 32 * 1024, 7, 7


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of W&B's offline run file, decoded with W&B's own protobuf schema. The file
    is a LevelDB-style log (32 KiB blocks; records of CRC, length, type) after a 7-byte `:W&B`
    header; wandb 0.31 keeps its reader in its Go service, so this walks the blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = HEADER, b""
    while pos + RECORD_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if left < RECORD_HEADER or (length == 0 and kind == 0):
            pos += left  # the block's zero-filled tail
            continue
        pieces += data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _wandb_run(out: Path) -> dict[str, Any]:
    """The offline run's name, config keys, per-step history, summary and exit code."""
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, "one run, from rank 0 only"
    run: dict[str, Any] = {"history": {}, "summary": {}}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["name"] = record.run.display_name
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}  # fmt: skip
            run["history"][items["_step"]] = items
        elif kind == "summary":
            run["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update})
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


# --------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_all_three_trackers_hold_the_runs_per_epoch_top1(tracked: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = tracked["out"], tracked["rows"]
    top1 = _column(rows, "val_top1")
    assert len(top1) == 2

    events = EventAccumulator(str(out / f"{NAME}_tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [
        (1, pytest.approx(top1[0], rel=1e-6)),
        (2, pytest.approx(top1[1], rel=1e-6)),
    ]
    with pytest.MonkeyPatch.context() as mp:
        client, run = _mlflow_run(out, mp)
        assert _mlflow_series(client, run.info.run_id, "val/top1") == pytest.approx(top1)
    history = _wandb_run(out)["history"]
    assert [history[step]["val/top1"] for step in (1, 2)] == pytest.approx(top1)


@pytest.mark.slow
def test_mlflow_run_holds_settings_losses_and_final_figures(tracked: dict[str, Any]) -> None:
    out, rows, summary = tracked["out"], tracked["rows"], tracked["summary"]
    with pytest.MonkeyPatch.context() as mp:
        client, run = _mlflow_run(out, mp)
        loss = _mlflow_series(client, run.info.run_id, "train/loss")
    assert run.info.run_name == NAME and run.info.status == "FINISHED"
    assert loss == pytest.approx(_column(rows, "train_loss"))
    params = run.data.params
    assert params["config.epochs"] == "2" and params["config.seed"] == "3"
    assert params["kind"] == "teacher" and params["world_size"] == "2"
    assert params["output_dir"] == str(out)
    final = run.data.metrics  # the latest value of each key
    assert final["final/best_val_top1"] == pytest.approx(summary["best_val_top1"])
    assert final["final/best_epoch"] == summary["best_epoch"]


@pytest.mark.slow
def test_wandb_offline_run_holds_settings_and_final_figures(tracked: dict[str, Any]) -> None:
    out, rows, summary = tracked["out"], tracked["rows"], tracked["summary"]
    run = _wandb_run(out)
    assert run["name"] == NAME and run["exit_code"] == 0
    assert run["config"]["config"]["epochs"] == 2 and run["config"]["kind"] == "teacher"
    assert [run["history"][s]["train/loss"] for s in (1, 2)] == pytest.approx(
        _column(rows, "train_loss")
    )
    assert run["summary"]["best_val_top1"] == pytest.approx(summary["best_val_top1"])
    assert run["summary"]["outcome"] == "finished"


@pytest.mark.slow
def test_trackers_write_only_inside_the_output_folder(tracked: dict[str, Any]) -> None:
    out = tracked["out"]
    assert {p.name for p in out.parent.iterdir()} - {".cache"} == {"models"}
    assert {"mlruns", "wandb", f"{NAME}_tensorboard"} <= {p.name for p in out.iterdir()}


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_library_is_refused_before_any_work(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda mod, *a: None if mod == name else real(mod, *a)
    )
    result = invoke_cli(*TRAIN, "--log-to", f"tensorboard,{name}", "--output-dir", tmp_path)
    assert result.exit_code == 2
    assert_error_line(result.stderr, f"--log-to {name}", f"pip install 'mlkd[{name}]'")
    assert not any(tmp_path.iterdir())


def test_wandb_online_without_a_login_is_refused_before_any_work(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DISABLED", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "models"
    result = invoke_cli(*TRAIN, "--log-to", "wandb", "--output-dir", out)
    assert result.exit_code == 2
    assert_error_line(result.stderr, "--log-to wandb", "wandb login", "WANDB_MODE=offline")
    assert not out.exists()


@pytest.mark.parametrize(
    ("raised", "status"),
    [(ValueError("a bug"), "FAILED"), (RunInterrupted("stopped", 15), "KILLED")],
)
def test_a_run_that_ends_early_closes_its_mlflow_run_as_failed_or_killed(
    raised: Exception, status: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlkd_cli.engine.loggers import tracking

    _quiet_tracking_env(monkeypatch, tmp_path)
    said: list[str] = []
    with pytest.raises(type(raised)), tracking(["mlflow"], tmp_path, "r", {"lr": 0.1}, said.append):
        raise raised
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # allowed for mlkd's store, then not
    assert said == [
        f"tracking in mlflow: experiment mlkd, local file store {tmp_path / 'mlruns'} "
        "(MLFLOW_TRACKING_URI for another)"
    ]
    _, run = _mlflow_run(tmp_path, monkeypatch)
    assert run.info.status == status and run.data.params == {"lr": "0.1"}


def test_mlflow_tracking_uri_is_honoured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlkd_cli.engine.loggers import tracking

    _quiet_tracking_env(monkeypatch, tmp_path)
    store = tmp_path / "elsewhere"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's choice, left as it is
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits")
    out = tmp_path / "models"
    with tracking(["mlflow"], out, "r", {"lr": 0.1}, lambda line: None) as (logger,):
        logger.log_epoch({"epoch": 1, "val_top1": 12.5})
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"
    assert not out.exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics == {"val/top1": 12.5}


def test_a_failed_run_ends_its_wandb_run_failed_in_wandb_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlkd_cli.engine.loggers import tracking

    _quiet_tracking_env(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "elsewhere"))
    out = tmp_path / "models"
    with pytest.raises(ValueError), tracking(["wandb"], out, "r", {"lr": 0.1}, print) as (logger,):
        logger.log_epoch({"epoch": 1, "val_top1": 12.5})
        raise ValueError("a bug")
    assert not out.exists()
    run = _wandb_run(tmp_path / "elsewhere")
    assert run["name"] == "r" and run["config"]["lr"] == 0.1
    assert run["history"][1]["val/top1"] == 12.5
    assert run["exit_code"] == 1 and run["summary"]["outcome"] == "failed"
