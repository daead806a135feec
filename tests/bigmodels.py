"""Tiny transformers models for the big-model tests: configs, reference outputs, sharded checkpoints."""

from __future__ import annotations

import logging

import torch

logging.getLogger("transformers").setLevel(logging.ERROR)


def configs():
    from transformers import BertConfig, GPT2Config, LlamaConfig, OPTConfig, T5Config

    return {
        "llama": (
            "LlamaForCausalLM",
            LlamaConfig(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
            ),
        ),
        "opt": (
            "OPTForCausalLM",
            OPTConfig(
                vocab_size=128,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
            ),
        ),
        "gpt2": ("GPT2LMHeadModel", GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)),
        "bert": (
            "BertModel",
            BertConfig(
                vocab_size=128,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                max_position_embeddings=64,
            ),
        ),
        "t5": (
            "T5ForConditionalGeneration",
            T5Config(vocab_size=128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0),
        ),
    }


def build(kind: str, *, empty: bool = False, seed: int = 0):
    import transformers

    from shardkit import init_empty_weights

    cls_name, config = configs()[kind]
    cls = getattr(transformers, cls_name)
    if empty:
        with init_empty_weights():
            return cls(config).eval()
    torch.manual_seed(seed)
    return cls(config).eval()


def inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 128, (2, 7), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if kind == "t5" else {"input_ids": ids}


def run(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs(kind))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def save(model, folder, shard="20KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    return folder
