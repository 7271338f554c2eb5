"""Compatibility shims. Everything that bends megatron-core to run where it was not written to run lives here."""

from salt_megatron.compat.cpu import ensure_megatron_runs_here

__all__ = ["ensure_megatron_runs_here"]
