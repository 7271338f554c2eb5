"""Hugging Face interop: import-hf (Llama, Qwen2, Mistral, Llama-3 RoPE scaling) gives the HF model's logits at TP = 1
and TP = 2, export-hf gives back the same tensors bit for bit, HF tokenizers in prepare, and the refusals."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

from tests.cli_run import assert_refused, refused_in_process, run_cli  # noqa: E402
from tests.dist_utils import run_workers  # noqa: E402
from tests.hf_models import checkpoint_logits, hf_logits, make_model, text  # noqa: E402

MODELS = {  # name -> (kind, make_model options): GQA and MHA, tied and untied, q/k/v biases, llama3 RoPE scaling
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {"tie": True}),
    "mistral": ("mistral", {"kv_heads": 4, "rope_theta": 20000.0}),
    "llama3": ("llama", {"tie": True, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192}}),
}
TOKENS = torch.randint(300, (2, 40), generator=torch.Generator().manual_seed(3))


def _import_all(rank, world, pairs):
    from salt_megatron.hf import import_hf

    for hf_dir, ckpt in pairs:
        import_hf.main(["--hf-model", hf_dir, "--save", ckpt, "--make-vocab-size-divisible-by", "32",
                        "--tensor-model-parallel-size", "2"])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    models, pairs = {}, []
    for name, (kind, options) in MODELS.items():
        models[name] = make_model(str(root / name), kind, **options)
        pairs.append((str(root / name), str(root / f"{name}_ckpt")))
    run_workers(_import_all, 1, pairs)
    return {"root": root, "models": models, "ckpt": {name: ckpt for name, (_, ckpt) in zip(MODELS, pairs)}}


@pytest.mark.parametrize("tp", [1, 2])
def test_imported_models_give_the_hf_logits(imported, tp):
    names = list(MODELS)
    ours = run_workers(checkpoint_logits, tp, [imported["ckpt"][n] for n in names], TOKENS)[0]
    for name, logits in zip(names, ours):
        reference = hf_logits(imported["models"][name], TOKENS)
        assert reference.abs().max() > 1.0  # the test can see a wrong mapping
        delta = (logits - reference).abs().max().item()
        assert delta <= 1e-4, f"{name} at TP={tp}: max |Δ| = {delta:.2e}"


def test_import_records_what_a_teacher_needs(imported):
    from salt_megatron.checkpointing import read_meta
    from salt_megatron.data.tokenizer import tokenizer_hash

    meta = read_meta(imported["ckpt"]["qwen2"])
    arch = meta["arch"]
    assert arch["add_qkv_bias"] and not arch["untie_embeddings_and_output_weights"] and arch["num_query_groups"] == 2
    assert arch["padded_vocab_size"] == 320 and arch["vocab_size"] == 300  # padded for TP 2 x 32
    assert meta["tokenizer_hash"] == tokenizer_hash(str(imported["root"] / "qwen2"))
    assert meta["imported_from"]["dtype"] == "float32" and len(meta["fingerprint"]) == 4
    llama3 = read_meta(imported["ckpt"]["llama3"])["arch"]
    assert llama3["rope_scaling_factor"] == 8.0 and llama3["rotary_base"] == 5000.0


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_import_then_export_gives_back_the_same_tensors(imported, name, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "exported"
    proc = run_cli("export-hf", "--load", imported["ckpt"][name], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = load_file(str(imported["root"] / name / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert set(original) == set(exported)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert torch.equal(hf_logits(str(out), TOKENS), hf_logits(imported["models"][name], TOKENS))


def test_hf_tokenizer_in_prepare_and_its_hash(imported, tmp_path):
    from tokenizers import Tokenizer

    from salt_megatron.data.prepare import prepare
    from salt_megatron.data.tokenizer import load_tokenizer, tokenizer_hash
    from salt_megatron.checkpointing import read_meta

    hf_dir = imported["root"] / "llama"
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text(60, seed)}) + "\n" for seed in range(5)))
    result = prepare([str(docs)], str(tmp_path / "d"), tokenizer_model=str(hf_dir), progress=False, workers=1)
    assert result["tokenizer_model"].endswith("d.tokenizer.json")
    assert result["tokenizer_hash"] == tokenizer_hash(str(hf_dir)) == read_meta(imported["ckpt"]["llama"])[
        "tokenizer_hash"]
    reference = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    expected = sum(len(reference.encode(text(60, seed)).ids) + 1 for seed in range(5))  # BOS ... EOS
    assert result["train"]["tokens"] == expected
    tok = load_tokenizer(result["tokenizer_model"])
    assert tok.tokenize("the union")[0] == 0 and tok.eod == 1 and tok.vocab_size == 300  # config.json's vocab


def test_student_with_another_tokenizer_is_refused(imported, tmp_path, capfd):
    from salt_megatron.data.prepare import prepare

    docs = tmp_path / "docs.txt"
    docs.write_text(text(3000))
    prepare([str(docs)], str(tmp_path / "sp"), vocab_size=300, progress=False, workers=1)
    refused_in_process(capfd, ["pretrain", "--data-path", tmp_path / "sp", "--train-iters", "2",
                               "--teacher-load", imported["ckpt"]["llama"], "--kd-steps", "1", "--num-layers", "1",
                               "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "16"],
                       r"was trained with another tokenizer")


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("change, pattern", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"architecture 'GPT2LMHeadModel' is not supported; supported: "
                                             r"LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     r"rope_scaling type 'yarn' \(supported: none, 'llama3'\)"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 8},
     r"head_dim 8 with 3 heads != hidden_size 64"),
])
def test_unsupported_configs_are_refused_before_anything_is_written(imported, tmp_path, capfd, change, pattern):
    src = _edit_config(imported["root"] / "llama", tmp_path / "model", **change)
    refused_in_process(capfd, ["import-hf", "--hf-model", src, "--save", tmp_path / "ckpt"], pattern)
    assert not (tmp_path / "ckpt").exists()


def test_a_missing_shard_is_refused(imported, tmp_path, capfd):
    src = tmp_path / "model"
    shutil.copytree(imported["root"] / "llama", src)
    os.remove(src / "model.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors"}}))
    refused_in_process(capfd, ["import-hf", "--hf-model", src, "--save", tmp_path / "ckpt"],
                       r"model-00001-of-00002.safetensors, model-00002-of-00002.safetensors named in "
                       r"model.safetensors.index.json are missing")
    assert not (tmp_path / "ckpt").exists()


def test_weights_that_do_not_match_the_config_are_refused(imported, tmp_path):
    src = _edit_config(imported["root"] / "llama", tmp_path / "model", intermediate_size=100)
    proc = run_cli("import-hf", "--hf-model", src, "--save", tmp_path / "ckpt")
    assert_refused(proc, r"the weights do not match config.json: decoder.layers.0.mlp.linear_fc1.weight: shape "
                         r"\(288, 64\) from the checkpoint, the config implies \(200, 64\)")
    assert not (tmp_path / "ckpt").exists()


def test_export_refuses_a_model_that_is_not_llama_shaped(tmp_path, capfd):
    from salt_megatron.hf.config import check_exportable
    from salt_megatron.model import GPTArchitecture
    from salt_megatron.errors import DataError

    arch = GPTArchitecture(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64, seq_length=16,
                           vocab_size=100, padded_vocab_size=128)
    with pytest.raises(DataError, match=r"not of Llama shape \(normalization 'LayerNorm' \(needs 'RMSNorm'\); "
                                        r"activation 'gelu' \(needs 'swiglu'\)\)"):
        check_exportable(arch, "ckpt")


def test_readme_path_hf_teacher_to_salt_student_and_out_again(imported, tmp_path):
    """README's three commands (import-hf, prepare with the HF tokenizer, pretrain with the imported teacher), then
    export-hf: transformers loads the student and gives salt_megatron's logits."""
    hf_dir, teacher = imported["root"] / "llama", imported["ckpt"]["llama"]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text(200, seed)}) + "\n" for seed in range(40)))
    proc = run_cli("prepare", "--input", docs, "--output-prefix", tmp_path / "data" / "sotu", "--tokenizer-model",
                   hf_dir, "--valid-fraction", "0.1", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("pretrain", "--data-path", tmp_path / "data" / "sotu", "--num-layers", "2", "--hidden-size", "32",
                   "--num-attention-heads", "4", "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
                   "--seq-length", "32", "--micro-batch-size", "4", "--make-vocab-size-divisible-by", "32",
                   "--train-iters", "3", "--eval-iters", "1", "--save", tmp_path / "student", "--teacher-load",
                   teacher, "--kd-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher: 2 layers x 64" in proc.stdout + proc.stderr
    proc = run_cli("evaluate", "--load", tmp_path / "student", "--data-path", tmp_path / "data" / "sotu", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout.strip().splitlines()[-1])["val_tokens"] > 0, proc.stderr
    proc = run_cli("export-hf", "--load", tmp_path / "student", "--out", tmp_path / "student_hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((tmp_path / "student_hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    tokens = TOKENS[:, :32]
    ours = run_workers(checkpoint_logits, 1, [str(tmp_path / "student")], tokens)[0][0]
    delta = (hf_logits(str(tmp_path / "student_hf"), tokens) - ours).abs().max().item()
    assert delta <= 1e-4, delta


def test_a_sharded_checkpoint_imports_like_a_single_file(imported, tmp_path):
    """save_pretrained's sharded layout (several model-0000k-of-0000n.safetensors and the index) reads the same."""
    sharded = tmp_path / "sharded"
    imported["models"]["llama"].save_pretrained(sharded, safe_serialization=True, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(imported["root"] / "llama" / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("model-*.safetensors"))) > 2
    run_workers(_import_all, 1, [(str(sharded), str(tmp_path / "ckpt"))])
    ours = run_workers(checkpoint_logits, 1, [str(tmp_path / "ckpt")], TOKENS)[0][0]
    assert (ours - hf_logits(imported["models"]["llama"], TOKENS)).abs().max().item() <= 1e-4
