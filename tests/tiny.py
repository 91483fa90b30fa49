"""Tiny random checkpoints of every Phi variant, made with transformers' own classes (test-only: imports torch).

Each variant keeps the feature that distinguishes its release (parallel block and biases, fused projections,
sliding window, LongRoPE, grouped KV heads, partial rotary, tied embeddings) at a size that runs in milliseconds.
Hidden sizes are multiples of 256 so llama.cpp's K-quants apply; rotary widths keep rotary_dim / 2 a multiple of 8
(onnxruntime's GroupQueryAttention needs that).  Norm weights and every bias are random too, so that an exporter
that drops a scale or a bias fails the comparison with transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PHI3_STOP_IDS = [32000, 32001, 32007]  # <|endoftext|>, <|assistant|>, <|end|>


def _longrope(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    short = np.round(1.0 + rng.random(n) * 0.5, 4)
    long = np.round(np.sort(1.0 + rng.random(n) * 6.0), 4)
    return {"type": "longrope", "short_factor": short.tolist(), "long_factor": long.tolist()}


# name -> (transformers config class name, config kwargs, tokenizer kind, stored dtype)
VARIANTS: dict[str, tuple[str, dict, str, str]] = {
    # Phi-1/1.5/2: LayerNorm + bias, parallel attention/MLP, partial rotary 0.5 (Phi-2 uses 0.4 of head_dim 80)
    "phi-2": ("PhiConfig", dict(vocab_size=51200, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5,
                                layer_norm_eps=1e-5, hidden_act="gelu_new", bos_token_id=50256,
                                eos_token_id=50256, tie_word_embeddings=False), "gpt2-codegen", "float16"),
    # Phi-3-mini-4k: fused projections, RMSNorm, SiLU, a sliding window the test prompts run past
    "phi-3-mini-4k": ("Phi3Config", dict(vocab_size=32064, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, original_max_position_embeddings=256,
                                         sliding_window=48, bos_token_id=1, eos_token_id=32000,
                                         pad_token_id=32000), "phi3", "bfloat16"),
    # Phi-3-mini-128k / Phi-3.5-mini: LongRoPE switching at original_max_position_embeddings = 64
    "phi-3-mini-128k": ("Phi3Config", dict(vocab_size=32064, hidden_size=256, intermediate_size=512,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                           max_position_embeddings=512, original_max_position_embeddings=64,
                                           rope_scaling=_longrope(32, 1), sliding_window=262144, bos_token_id=1,
                                           eos_token_id=32000, pad_token_id=32000), "phi3", "float32"),
    # Phi-3-medium: grouped KV heads (8 query heads share 2 KV heads)
    "phi-3-medium": ("Phi3Config", dict(vocab_size=32064, hidden_size=256, intermediate_size=768,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=256, original_max_position_embeddings=256,
                                        sliding_window=2047, bos_token_id=1, eos_token_id=32000,
                                        pad_token_id=32000), "phi3", "bfloat16"),
    # Phi-4-mini: partial rotary 0.75, tied embeddings, grouped KV heads, LongRoPE, GPT-style BPE vocab
    "phi-4-mini": ("Phi3Config", dict(vocab_size=50304, hidden_size=256, intermediate_size=768,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      partial_rotary_factor=0.75, max_position_embeddings=512,
                                      original_max_position_embeddings=64, rope_scaling=_longrope(24, 2),
                                      tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
                                      pad_token_id=50256), "gpt2", "float32"),
}
PHI3_VARIANTS = [v for v, (cls, *_rest) in VARIANTS.items() if cls == "Phi3Config"]
# Phi-4 family with the real vocabularies (tokenizers from OpenAI's BPE ranks, tests/tiktoken_vocab.py): 100k- and
# 200k-row embeddings at hidden 64, so they are not in VARIANTS (whose every test runs per variant) but tested where
# listed (tests/test_phi4.py, tests/test_interop.py).  Rotary widths keep rotary_dim / 2 = 8 and 24.
REAL_VOCAB_VARIANTS: dict[str, tuple[str, dict, str, str]] = {
    # Phi-4 (14B): cl100k vocabulary, grouped KV heads, no sliding window, rope_theta 250000
    "phi-4": ("Phi3Config", dict(vocab_size=100352, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 original_max_position_embeddings=256, rope_theta=250000.0, bos_token_id=100257,
                                 eos_token_id=100265, pad_token_id=100349), "phi4", "bfloat16"),
    # Phi-4-reasoning: Phi-4's architecture and vocabulary, the reasoning chat template (a 300-token system prompt)
    "phi-4-reasoning": ("Phi3Config", dict(vocab_size=100352, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           max_position_embeddings=512, original_max_position_embeddings=512,
                                           rope_theta=500000.0, bos_token_id=100257, eos_token_id=100265,
                                           pad_token_id=100349), "phi4-reasoning", "bfloat16"),
    # Phi-4-mini-reasoning: o200k vocabulary, partial rotary 0.75, tied embeddings, LongRoPE
    "phi-4-mini-reasoning": ("Phi3Config", dict(vocab_size=200064, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1,
                                                partial_rotary_factor=0.75, max_position_embeddings=512,
                                                original_max_position_embeddings=64, rope_scaling=_longrope(24, 3),
                                                tie_word_embeddings=True, bos_token_id=199999, eos_token_id=199999,
                                                pad_token_id=199999), "phi4-mini-reasoning", "bfloat16"),
}
ALL_VARIANTS = {**VARIANTS, **REAL_VOCAB_VARIANTS}
# generation_config.json eos ids by tokenizer kind: the chat turn's end and <|endoftext|>
STOP_IDS = {"phi3": PHI3_STOP_IDS, "phi4": [100257, 100265], "phi4-reasoning": [100257, 100265],
            "phi4-mini-reasoning": [199999, 200020]}


def _randomize_norms_and_biases(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def make_checkpoint(variant: str, out_dir: Path, seed: int = 0, dtype: str | None = None,
                    tokenizer: bool = True) -> Path:
    """Write a tiny random checkpoint of `variant` in the exact Hugging Face layout into out_dir."""
    import torch
    import transformers

    cls_name, kwargs, tok_kind, stored = ALL_VARIANTS[variant]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = getattr(transformers, cls_name)(initializer_range=0.08, **kwargs)
    torch.manual_seed(seed)
    model_cls = transformers.PhiForCausalLM if cls_name == "PhiConfig" else transformers.Phi3ForCausalLM
    model = model_cls(config).eval()
    _randomize_norms_and_biases(model, seed + 1)
    model = model.to(getattr(torch, dtype or stored))
    model.save_pretrained(out_dir)
    eos = STOP_IDS.get(tok_kind, [kwargs["eos_token_id"]])
    gen = {"bos_token_id": kwargs.get("bos_token_id"), "eos_token_id": eos, "pad_token_id": kwargs.get("pad_token_id")}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer:
        import vocab_build

        if tok_kind == "phi3":
            vocab_build.write_phi3_tokenizer(out_dir)
        elif tok_kind.startswith("phi4"):
            import tiktoken_vocab

            tiktoken_vocab.write_tokenizer(out_dir, tok_kind)
        else:
            vocab_build.write_gpt2_tokenizer(out_dir, codegen_whitespace=(tok_kind == "gpt2-codegen"))
    return out_dir


def load_reference(ckpt_dir: Path):
    """transformers' own model for the checkpoint, in float32 with eager attention: the numerical reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """Full-recompute logits (T, V) for a prompt."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation with transformers' KV cache: (tokens, logits of each step (steps, V)).

    logits[0] is the prompt's last position; logits[i] the position after the i-th generated token.
    """
    import torch

    out = []
    with torch.no_grad():
        res = model(torch.tensor([prompt]), use_cache=True)
        past = res.past_key_values
        step_logits = [res.logits[0, -1].float().numpy()]
        for _ in range(steps):
            tok = int(np.argmax(step_logits[-1]))
            out.append(tok)
            res = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = res.past_key_values
            step_logits.append(res.logits[0, -1].float().numpy())
    return out, np.stack(step_logits[:-1])


def session_greedy(session, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode through any edgephi Session, with reference_greedy's contract: (tokens, logits of each step)."""
    logits = [session.forward(prompt)]
    out = []
    for _ in range(steps):
        out.append(int(np.argmax(logits[-1])))
        logits.append(session.forward([out[-1]]))
    return out, np.stack(logits[:-1])


def random_prompt(n: int, vocab: int, seed: int = 0, low: int = 100) -> list[int]:
    """Prompt ids drawn from ordinary tokens (avoiding specials at the top and bytes at the bottom)."""
    rng = np.random.default_rng(seed)
    return rng.integers(low, min(vocab, 30000), size=n).tolist()
