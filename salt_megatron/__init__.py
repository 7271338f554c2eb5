"""salt_megatron: SALT (small-LM-assisted large-LM pretraining) on megatron-core.

Importing the package applies, once, what megatron-core needs to run on a CPU-only torch (``salt_megatron.compat``;
nothing when CUDA is present).  Every command and module of the package comes through here first.
"""

__version__ = "0.2.0"

from salt_megatron.compat import ensure_megatron_runs_here  # noqa: E402

ensure_megatron_runs_here()

from salt_megatron.kd import SaltLoss, salt_loss, vocab_parallel_kl_div  # noqa: E402
from salt_megatron.schedule import SaltSchedule  # noqa: E402

__all__ = ["vocab_parallel_kl_div", "salt_loss", "SaltLoss", "SaltSchedule"]
