"""Where training numbers go: one compact console line, tensorboard, and a JSON-lines file (for reports/plots).

Only the last rank writes (it holds the loss: the last pipeline stage), as Megatron's ``print_rank_last`` does.
"""

from __future__ import annotations

import json
import os
import sys
import time


class MetricsWriter:
    def __init__(self, *, enabled: bool, tensorboard_dir: str | None = None, metrics_file: str | None = None,
                 stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tb = None
        self.file = None
        if not enabled:
            return
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.file = open(metrics_file, "a", buffering=1)

    def train(self, step: int, train_iters: int, m: dict, echo: bool = True) -> None:
        """Record every step (tensorboard, metrics file); print the console line when ``echo``."""
        if not self.enabled:
            return
        self._record("train", step, m)
        if not echo:
            return
        kd = f" kd {m['kd']:.4f}" if m.get("kd") is not None else ""
        print(
            f"step {step:>6}/{train_iters} | loss {m['loss']:.4f} | ce {m['ce']:.4f}{kd} | ω {m['kd_weight']:.3f} | "
            f"lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | "
            f"{m['step_time_s'] * 1e3:.0f} ms",
            file=self.stream, flush=True,
        )

    def eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        extra = "".join(f" | {k[len('val_loss_'):]} {v:.4f}" for k, v in m.items() if k.startswith("val_loss_"))
        print(f"step {step:>6} | validation loss {m['val_loss']:.4f} | ppl {m['val_ppl']:.2f}{extra}",
              file=self.stream, flush=True)
        self._record("eval", step, m)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def _record(self, kind: str, step: int, m: dict) -> None:
        if self.tb is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.file is not None:
            self.file.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **m}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
