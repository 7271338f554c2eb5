"""The KD op: KL(teacher ‖ student) on vocab-parallel logits, and the SALT loss built on it.

One file per concern (nothing here knows about training):

* ``protocol``       what a kernel set provides (``row_stats`` / ``student_grad``) and the capabilities it declares
* ``torch_kernels``  the PyTorch kernel set (the reference implementation; any device and dtype)
* ``fused_kernels``  the compiled ``csrc/`` kernels behind the same protocol
* ``build``          finding or just-in-time compiling those kernels; ``kernel_flags``: their flags, shared with
                     ``setup.py``
* ``select``         ``impl`` = auto / torch / fused → a kernel set
* ``vocab_parallel`` the vocab-parallel KL: one pass per shard, two collectives, local backward
* ``one_pass``       the next-token CE from the KD pass (any τ, TP, padding), in the KD's two collectives
* ``loss``           the SALT loss, (1-ω)·CE + ω·τ²·KD, with CE and KD from that one pass
* ``fused_linear``   the SALT loss from the output layers' inputs, chunked: logits never held whole
* ``reference``      the float64 definition every test and benchmark compares with
"""

from salt_megatron.kd.fused_linear import fused_linear_salt_loss
from salt_megatron.kd.loss import SaltLoss, salt_loss, vocab_parallel_cross_entropy
from salt_megatron.kd.protocol import KernelSet
from salt_megatron.kd.select import IMPLS, select_kernels
from salt_megatron.kd.torch_kernels import TORCH_KERNELS
from salt_megatron.kd.vocab_parallel import vocab_parallel_kl_div

__all__ = ["vocab_parallel_kl_div", "salt_loss", "SaltLoss", "fused_linear_salt_loss", "vocab_parallel_cross_entropy",
           "KernelSet", "IMPLS", "select_kernels", "TORCH_KERNELS"]
