"""Per-step metrics: WORKDIR/metrics.jsonl, TensorBoard event files, a console progress bar, and optionally
Weights & Biases (``train.wandb_project``; ``pip install 'wings_jax[wandb]'``)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from etils import epath
from tqdm import tqdm

from wings_jax.config import ConfigError

LEARNING_RATE_PREFIX = "learning_rate/"  # metrics 'learning_rate/<group>', one per optimizer group


class MetricsWriter:
    """Writes on the first process only; the others keep silent."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True,
                 wandb_project: str = "", run_config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        if not enabled:
            return
        directory = epath.Path(workdir)  # local or gs://
        directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = (directory / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._wandb = WandbWriter(wandb_project, workdir, run_config or {}) if wandb_project else None

    def write(self, step: int, metrics: Mapping[str, float | None]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (None if v is None else float(v)) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step" and value is not None:
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.write(step, record)
        shown = {k: f"{record[k]:.4g}" for k in ("loss", "grad_norm", "tokens_per_s", "mfu") if record.get(k) is not None}
        # every parameter group's learning rate (groups have their own peaks)
        shown.update({f"lr/{k.split('/', 1)[1]}": f"{v:.3g}" for k, v in record.items()
                      if k.startswith(LEARNING_RATE_PREFIX) and v is not None})
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(step - self._bar.n)

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._tb.close()
            self._jsonl.close()
            if self._wandb is not None:
                self._wandb.close()


class WandbWriter:
    """One Weights & Biases run per workdir: a resumed training run goes on logging into the same run (its id is
    kept in WORKDIR/wandb_run_id). ``WANDB_MODE=offline`` writes it locally for a later ``wandb sync``."""

    def __init__(self, project: str, workdir: str, run_config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.wandb_project is set but wandb is not installed; "
                              "pip install 'wings_jax[wandb]' or leave train.wandb_project empty") from None
        id_file = epath.Path(workdir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id)
        local = None if workdir.startswith("gs://") else workdir  # wandb keeps its files on a local disk
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=local, config=dict(run_config),
                               name=os.path.basename(os.path.normpath(workdir)))

    def write(self, step: int, record: Mapping[str, float | None]) -> None:
        self._run.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)

    def close(self) -> None:
        self._run.finish()
