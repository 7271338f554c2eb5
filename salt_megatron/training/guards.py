"""Why a run stops before ``--train-iters``, agreed by every rank at a step boundary.

* **SIGTERM / SIGUSR1** (a scheduler's warning before the time limit, e.g. SLURM's ``--signal=USR1@120``, or a
  preemption): the step in flight finishes, a checkpoint is saved (with ``--save``), the run exits with code 0.
* ``--exit-duration-in-mins`` and ``--exit-interval``: Megatron-LM's meanings (wall time since the run started;
  every N steps), with the same checkpoint-and-exit-0.
* ``--check-for-nan-in-loss-and-grad`` (on by default): a NaN/Inf loss or gradient norm stops the run with one line
  naming the step, before anything is saved, so the last good checkpoint stays the latest.

Ranks may see a signal or the clock differently (a signal reaches some processes first): one all-reduce (MAX) per
step makes them stop at the same step.
"""

from __future__ import annotations

import argparse
import math
import signal
import threading
import time

import torch

from salt_megatron.errors import TrainingDiverged

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_SIGNAL, _DURATION, _INTERVAL = 3, 2, 1  # the MAX wins: a signal outranks the clock, the clock the interval


def add_exit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stopping early (SIGTERM/SIGUSR1 always: checkpoint at the next step, exit 0)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="checkpoint and exit 0 once the run has taken this long (Megatron-LM's flag)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="checkpoint and exit 0 when the step is a multiple of this (Megatron-LM's flag)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="do not stop on a NaN/Inf loss or gradient norm")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_true",
                   default=True, help=argparse.SUPPRESS)


class StopRequests:
    """Installs the signal handlers (restored by :meth:`close`) and answers "stop after this step, and why?"."""

    def __init__(self, *, exit_duration_in_mins: float | None, exit_interval: int | None, start_time: float):
        self.exit_duration_in_mins, self.exit_interval, self.start_time = (exit_duration_in_mins, exit_interval,
                                                                           start_time)
        self.received: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in EXIT_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def reason(self, step: int) -> str | None:
        """Collective (every rank calls it after every step): why the run stops after ``step``, or None."""
        minutes = (time.time() - self.start_time) / 60
        code = 0
        if self.exit_interval and step % self.exit_interval == 0:
            code = _INTERVAL
        if self.exit_duration_in_mins is not None and minutes >= self.exit_duration_in_mins:
            code = _DURATION
        if self.received is not None:
            code = _SIGNAL
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int32, device=_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag.item())
        return {0: None, _INTERVAL: f"--exit-interval {self.exit_interval} reached",
                _DURATION: f"--exit-duration-in-mins {self.exit_duration_in_mins} reached ({minutes:.1f} min)",
                _SIGNAL: f"{self.received or 'a signal'} received (on this or another rank)"}[code]


def _device():
    from salt_megatron.distributed import compute_device

    return compute_device() if torch.distributed.get_backend() == "nccl" else "cpu"


def check_finite(step: int, metrics: dict, last_checkpoint: str | None) -> None:
    """Collective: raise :class:`TrainingDiverged` on every rank when any rank's loss or the gradient norm of
    ``step`` is NaN/Inf (before anything of that step is saved)."""
    values = {"loss": metrics.get("loss"), "grad norm": metrics.get("grad_norm") if metrics.get(
        "grad_norm_measured") else None}
    bad = [f"{name} {value}" for name, value in values.items() if value is not None and not math.isfinite(value)]
    flag = 1 if bad else 0
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        t = torch.tensor([flag], dtype=torch.int32, device=_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = int(t.item())
    if flag:
        where = ", ".join(bad) if bad else "a NaN/Inf loss or gradient on another rank"
        raise TrainingDiverged(
            f"step {step}: {where}; stopped before saving, "
            + (f"{last_checkpoint} is left as the latest" if last_checkpoint else "no checkpoint was written")
            + " (lower --lr or --clip-grad, or check the data; --no-check-for-nan-in-loss-and-grad turns this check "
            "off)")
