"""Weights & Biases logging (train.wandb_project): off by default, offline runs next to metrics.jsonl, one run
per workdir across restarts, a clear error without the package."""
import glob
import json
import os
import sys
import time

import pytest

from wings_jax.config import ConfigError, load_config
from wings_jax.training.metrics import MetricsWriter

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def test_off_by_default():
    assert load_config(DEMO).train.wandb_project == ""


def test_without_the_package_the_error_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb fails
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'wings_jax\[wandb\]'"):
        MetricsWriter(str(tmp_path), 3, 0, wandb_project="p")


def test_offline_run_gets_the_metrics_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    workdir = str(tmp_path / "run")
    for start, losses in ((0, [2.0, 1.5]), (2, [1.25])):
        writer = MetricsWriter(workdir, 3, start, wandb_project="wings-test", run_config={"train": {"steps": 3}})
        for step, loss in enumerate(losses, start=start + 1):
            writer.write(step, {"loss": loss, "mfu": None})
        writer.close()
        time.sleep(1.1)  # offline run directories are named to the second: a real restart takes longer than that
    run_id = open(os.path.join(workdir, "wandb_run_id")).read()
    runs = sorted(glob.glob(os.path.join(workdir, "wandb", f"offline-run-*-{run_id}", "run-*.wandb")))
    assert len(runs) == 2  # the restart logged into the same run id
    assert [row for path in runs for row in _history(path)] == [(1, 2.0), (2, 1.5), (3, 1.25)]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["loss"] for line in f] == [2.0, 1.5, 1.25]


def _history(path):
    """(step, loss) of each history record of an offline run file."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(path)
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            if "loss" in items:
                rows.append((items["_step"], items["loss"]))
    return rows
