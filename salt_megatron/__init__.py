"""salt_megatron: SALT (small-LM-assisted large-LM pretraining) on megatron-core.

On a CPU-only torch, importing this package makes megatron-core runnable here (see ``salt_megatron.compat``).
"""

from salt_megatron.compat import ensure_megatron_runs_here
from salt_megatron.kd_loss import SaltLoss, salt_loss, vocab_parallel_kl_div
from salt_megatron.schedule import SaltSchedule

__version__ = "0.1.0"

ensure_megatron_runs_here()

__all__ = ["vocab_parallel_kl_div", "salt_loss", "SaltLoss", "SaltSchedule", "ensure_megatron_runs_here"]
