"""Tiny random causal LMs and real PEFT adapters for tests (nothing is downloaded)."""
from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, get_peft_model
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from suites.tinytasks import char_tokenizer
from suites.tinytasks import split_samples

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # q/k/v carry biases
}
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96


def tiny_base(arch: str = "llama", attn: str = "eager", seed: int = 0, layers: int = 2, hidden: int = 64,
              vocab: int = VOCAB) -> torch.nn.Module:
    config_class, model_class = ARCHS[arch]
    config = config_class(vocab_size=vocab, hidden_size=hidden, intermediate_size=7 * hidden // 4, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          attn_implementation=attn, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return model_class(config).eval()


def make_adapter(base: torch.nn.Module, path: Path, rank: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
                 rslora: bool = False, seed: int = 0, **extra) -> Path:
    """Save a real PEFT LoRA adapter for `base` with random, non-zero A and B (so it changes the outputs)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                        init_lora_weights=False, lora_dropout=0.0, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), config)
    peft_model.save_pretrained(path)
    return Path(path)


def random_ids(batch: int = 2, length: int = 10, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_checkpoint(root: Path, top_k: int = 2, names: tuple[str, str, str] = ("alpha", "beta", "gamma")) -> Path:
    """A MeteoRA checkpoint over a tiny base saved with the char tokenizer and three random adapters (named
    `names`; ranks 4, 8, 8; the third on q_proj only): what the serving tests load. Returns its directory."""
    from meteora_moe import MeteoraModel

    tokenizer = char_tokenizer()
    base = tiny_base(vocab=len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapters = {name: make_adapter(base, root / "adapters" / name, r, 2 * r, t, seed=i)
                for i, (name, r, t) in enumerate(zip(names, (4, 8, 8), (ALL_MODULES, ALL_MODULES, ["q_proj"])))}
    MeteoraModel.from_adapters(root / "base", adapters, top_k=top_k).save_pretrained(root / "checkpoint")
    return root / "checkpoint"


def write_world(root: Path, tasks: dict[str, int], targets: dict[str, list[str]] | None = None, seed: int = 0) -> Path:
    """A tiny base (with a char tokenizer), one random adapter and task data per task, and their manifest.
    Adapters target every projection unless `targets` names a task's modules; `seed` varies their weights."""
    base = tiny_base(layers=2, hidden=32)
    base.save_pretrained(root / "base")
    char_tokenizer().save_pretrained(root / "base")
    entries = []
    for index, (task, rank) in enumerate(tasks.items()):
        modules = (targets or {}).get(task, ALL_MODULES)
        make_adapter(base, root / "adapters" / task, rank, 2 * rank, modules, seed=index + 100 * seed)
        train_set, eval_set = split_samples(task, 64, 16, seed=index)
        for split, samples in (("train", train_set), ("eval", eval_set)):
            (root / "data" / task).mkdir(parents=True, exist_ok=True)
            (root / "data" / task / f"{split}.jsonl").write_text("\n".join(json.dumps(s) for s in samples) + "\n")
        entries.append({"name": task, "uri": str(root / "adapters" / task),
                        "data": {s: str(root / "data" / task / f"{s}.jsonl") for s in ("train", "eval")}})
    manifest = {"apiVersion": "meteora/v1", "kind": "AdapterManifest",
                "base_model": {"name": "tiny", "uri": str(root / "base")}, "adapters": entries}
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root / "manifest.yaml"


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny Llama as a GGUF file written with the gguf package (fp32 tensors, a byte-level BPE vocabulary and a
    chat template), as llama.cpp's converters lay it out."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    model = tiny_base(layers=2, hidden=32, seed=seed)
    config = model.config
    characters = sorted(ByteLevel.alphabet())  # byte-level BPE: one symbol per byte
    tokens = ["<unk>", "<|im_start|>", "<|im_end|>"] + characters + ["ab", "Ġt"]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-gguf")
    writer.add_license("apache-2.0")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["a b", "Ġ t"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    names = {"embed_tokens": "token_embd", "norm": "output_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    torch.manual_seed(seed)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":
            name = "output.weight"
        else:
            parts = key.removeprefix("model.").removesuffix(".weight").split(".")
            if parts[0] == "layers":
                name = f"blk.{parts[1]}.{names['.'.join(parts[2:])]}.weight"
            else:
                name = f"{names[parts[0]]}.weight"
        if name == "token_embd.weight" or name == "output.weight":
            tensor = torch.randn(len(tokens), config.hidden_size) * 0.02  # this vocabulary's size
        writer.add_tensor(name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_serves(checkpoint: str | Path) -> None:
    """The checkpoint loads (with its base and tokenizer) and the serving engine generates from it."""
    from meteora_moe import MeteoraModel, load_tokenizer
    from meteora_moe.serving import GenerationEngine, SamplingParams

    model = MeteoraModel.from_pretrained(checkpoint)
    engine = GenerationEngine(model, load_tokenizer(model.base_info.uri))
    events = engine.generate([[1, 20, 21, 22]], SamplingParams(max_tokens=3, temperature=0))[0]
    assert 1 <= len(events) <= 3 and events[-1].finish_reason
