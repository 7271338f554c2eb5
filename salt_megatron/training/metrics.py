"""Where training numbers go: one compact console line, tensorboard, and a JSON-lines file (for reports/plots).

Only the last rank writes (it holds the loss: the last pipeline stage), as Megatron's ``print_rank_last`` does.
``--log-format megatron`` prints Megatron-LM's own iteration and validation lines instead of the compact ones, so
log parsers written for Megatron-LM work: ``lm loss`` is the next-token cross-entropy (as in Megatron-LM), and a
KD step adds ``kd loss`` and ``salt loss`` (the optimised (1-ω)·CE + ω·τ²·KD).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

LOG_FORMATS = ("salt", "megatron")


class MetricsWriter:
    def __init__(self, *, enabled: bool, tensorboard_dir: str | None = None, metrics_file: str | None = None,
                 stream=None, log_format: str = "salt"):
        self.enabled = enabled
        self.log_format = log_format
        # since the last printed line, as Megatron-LM counts them per log interval
        self.skipped_iterations = self.nan_iterations = self.interval_steps = 0
        self.interval_seconds = 0.0
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
        self.skipped_iterations += bool(m.get("skipped"))
        self.nan_iterations += m.get("loss") is not None and m["loss"] != m["loss"]
        self.interval_steps += 1
        self.interval_seconds += m["step_time_s"]
        if not echo:
            return
        if self.log_format == "megatron":
            print(self._megatron_line(step, train_iters, m), file=self.stream, flush=True)
            self.skipped_iterations = self.nan_iterations = self.interval_steps = 0
            self.interval_seconds = 0.0
            return
        kd = f" kd {m['kd']:.4f}" if m.get("kd") is not None else ""
        print(
            f"step {step:>6}/{train_iters} | loss {m['loss']:.4f} | ce {m['ce']:.4f}{kd} | ω {m['kd_weight']:.3f} | "
            f"lr {m['lr']:.2e} | grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | "
            f"{m['step_time_s'] * 1e3:.0f} ms",
            file=self.stream, flush=True,
        )

    def _megatron_line(self, step: int, train_iters: int, m: dict) -> str:
        """Megatron-LM's ``training_log`` line, field for field (time and counts over the steps since the last one)."""
        per_step = self.interval_seconds / max(self.interval_steps, 1)
        line = (f" [{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}] iteration {step:8d}/{train_iters:8d} |"
                f" consumed samples: {m['consumed_samples']:12d} |"
                f" elapsed time per iteration (ms): {per_step * 1000.0:.1f} |"
                f" learning rate: {m['lr']:.6E} | global batch size: {m['global_batch_size']:5d} |"
                f" lm loss: {m['ce']:.6E} |")
        if m.get("kd") is not None:
            line += f" kd loss: {m['kd']:.6E} | salt loss: {m['loss']:.6E} | kd weight: {m['kd_weight']:.3f} |"
        line += " loss scale: 1.0 |"
        if m.get("grad_norm_measured"):
            line += f" grad norm: {m['grad_norm']:.3f} |"
        return line + (f" number of skipped iterations: {self.skipped_iterations:3d} |"
                       f" number of nan iterations: {self.nan_iterations:3d} |")

    def eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        if self.log_format == "megatron":  # Megatron-LM's evaluate_and_print_results
            text = (f" validation loss at iteration {step} | lm loss value: {m['val_loss']:.6E} | "
                    f"lm loss PPL: {m['val_ppl']:.6E} | ")
            print("-" * (len(text) + 1) + "\n" + text + "\n" + "-" * (len(text) + 1), file=self.stream, flush=True)
            self._record("eval", step, m)
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
