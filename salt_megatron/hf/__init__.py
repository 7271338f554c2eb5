"""Hugging Face interop: Llama-family checkpoints in as teachers (``import-hf``), trained models out
(``export-hf``), HF tokenizers for ``prepare``.  Reads and writes safetensors; ``transformers`` is not needed."""
