"""Per-step metrics: WORKDIR/metrics.jsonl, TensorBoard event files and a console progress bar."""
from __future__ import annotations

import json
import os
from typing import Mapping

from etils import epath
from tqdm import tqdm

LEARNING_RATE_PREFIX = "learning_rate/"  # metrics 'learning_rate/<group>', one per optimizer group


class MetricsWriter:
    """Writes on the first process only; the others keep silent."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        directory = epath.Path(workdir)  # local or gs://
        directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = (directory / "metrics.jsonl").open("a")
        from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, float | None]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (None if v is None else float(v)) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step" and value is not None:
                self._tb.add_scalar(name, value, step)
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
