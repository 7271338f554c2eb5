"""Tiny random Hugging Face models (``transformers``, fp32) with a real tokenizer, saved as users have them."""

from __future__ import annotations

import json
import os

import torch

WORDS = ("the state of the union is strong and the congress shall make laws for the people of this nation we "
         "will work together to build a better future").split()


def text(n_words: int = 400, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist())


def save_tokenizer(directory: str, vocab_size: int = 120) -> None:
    """A byte-level BPE tokenizer trained on the test text, with <s>/</s> as BOS/EOS (ids 0 and 1), BOS added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text(2000, seed) for seed in range(3)], trainer)
    # BOS on every sequence, as Llama's tokenizer.json does it
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)


def make_model(directory: str, kind: str = "llama", *, vocab_size: int = 300, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, tie: bool = False, rope_theta: float = 5000.0, seed: int = 0,
               **extra):
    """Save a random ``kind`` ("llama", "qwen2", "mistral") model and a tokenizer into ``directory``; returns it.

    Weights are drawn wider than the init (std 0.2) so that a wrong mapping moves the logits far beyond 1e-4."""
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[kind]
    config = cls[0](vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 16,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=rope_theta,
                    bos_token_id=0, eos_token_id=1, **({"sliding_window": None} if kind == "mistral" else {}), **extra)
    torch.manual_seed(seed)
    model = cls[1](config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory)
    return model


def hf_logits(model_or_dir, tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s, vocab]`` fp32 logits of an HF model (or a directory ``from_pretrained`` loads)."""
    import transformers

    model = model_or_dir
    if isinstance(model_or_dir, (str, os.PathLike)):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def checkpoint_logits(rank, world, checkpoints, tokens):
    """Each checkpoint's logits over the real vocabulary, built at TP = world (gathered from the vocab shards)."""
    from megatron.core import parallel_state, tensor_parallel

    from salt_megatron import checkpointing
    from salt_megatron.distributed import initialize_distributed
    from salt_megatron.model import GPTArchitecture, build_gpt_model, causal_attention_mask

    initialize_distributed(world, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    out = []
    for ckpt in checkpoints:
        meta = checkpointing.read_meta(ckpt)
        arch = GPTArchitecture.from_dict(meta["arch"])
        model = build_gpt_model(arch)
        checkpointing.load_model_weights(meta["path"], model)
        model.eval()
        positions = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
        with torch.no_grad():
            shard = model(tokens, positions, causal_attention_mask(tokens.shape[1]))
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(shard)
        assert parallel_state.get_tensor_model_parallel_world_size() == world
        out.append(logits[..., :arch.vocab_size])
    return out
