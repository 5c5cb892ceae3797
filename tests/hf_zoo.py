"""transformers models as users build them: library defaults, random weights.

Each entry builds a model from its config class with every default left as
the library sets it (attention implementation included: SDPA where the
model supports it) except the sizes, made tiny so the Triton interpreter
runs them on CPU in seconds: layers, widths, heads, vocabulary, positions.
No weights or data are loaded from anywhere. The loss is computed inside
the model (``labels=``), so it is part of the compiled graph.

``dropout`` says whether the defaults train with dropout: those models are
compared with eager in ``eval()`` mode (dropout off, nothing else changes
for these architectures), and their training mode is checked apart
(``tests/test_transformers_zoo.py::test_training_mode_with_default_dropout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BATCH, TOKENS, VOCAB = 2, 8, 96

#: the sizes every decoder/encoder config is shrunk to (names differ per family)
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=32)


@dataclass
class HFEntry:
    name: str
    kind: str                                  # "decoder", "encoder", "encoder-decoder", ...
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]                 # keyword arguments of the model's forward
    slow: bool = False                         # left out of the default test run

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build()

    def batch(self) -> dict:
        torch.manual_seed(1)
        return self.inputs()

    def dropout(self, model: torch.nn.Module) -> bool:
        """Whether the model as built trains with dropout (any p > 0)."""
        return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()) or \
            any(isinstance(v, float) and v > 0 and "drop" in k and "layerdrop" not in k
                for k, v in model.config.to_dict().items())


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(2, vocab, (BATCH, TOKENS))


def _lm(cls_name: str, config_name: str, **sizes) -> Callable[[], torch.nn.Module]:
    def build():
        import transformers
        config = getattr(transformers, config_name)(**sizes)
        return getattr(transformers, cls_name)(config)
    return build


def _causal_lm(name, cls, config, slow=False, **sizes) -> HFEntry:
    def inputs():
        ids = _ids()
        return {"input_ids": ids, "labels": ids}
    return HFEntry(name, "decoder", _lm(cls, config, **sizes), inputs, slow)


def _masked_lm(name, cls, config, slow=False, **sizes) -> HFEntry:
    def inputs():
        ids = _ids()
        mask = torch.ones(BATCH, TOKENS, dtype=torch.long)
        mask[1, -3:] = 0                                 # the second sequence is padded
        labels = torch.full_like(ids, -100)
        labels[:, 1::3] = ids[:, 1::3]                   # a few masked positions
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return HFEntry(name, "encoder", _lm(cls, config, **sizes), inputs, slow)


def _seq2seq(name, cls, config, slow=False, **sizes) -> HFEntry:
    def inputs():
        return {"input_ids": _ids(), "labels": _ids()[:, :6].contiguous()}
    return HFEntry(name, "encoder-decoder", _lm(cls, config, **sizes), inputs, slow)


def _vit() -> HFEntry:
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=16, patch_size=8, num_labels=5)

    def inputs():
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16),
                "labels": torch.randint(0, 5, (BATCH,))}
    return HFEntry("vit", "vision encoder",
                   _lm("ViTForImageClassification", "ViTConfig", **sizes), inputs)


def _whisper() -> HFEntry:
    sizes = dict(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, max_source_positions=8, max_target_positions=16,
                 pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)

    def inputs():
        return {"input_features": torch.randn(BATCH, 8, 16), "labels": _ids()[:, :6].contiguous()}
    return HFEntry("whisper", "speech encoder-decoder",
                   _lm("WhisperForConditionalGeneration", "WhisperConfig", **sizes), inputs,
                   slow=True)


ENTRIES = [
    _causal_lm("gpt2", "GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2,
               n_head=4, n_positions=32),
    _causal_lm("gpt_neox", "GPTNeoXForCausalLM", "GPTNeoXConfig", slow=True, **{
        k: v for k, v in LLAMA_LIKE.items() if k != "num_key_value_heads"}),
    _causal_lm("llama", "LlamaForCausalLM", "LlamaConfig", **LLAMA_LIKE),
    _causal_lm("mistral", "MistralForCausalLM", "MistralConfig", slow=True, **LLAMA_LIKE),
    _causal_lm("qwen2", "Qwen2ForCausalLM", "Qwen2Config", slow=True, **LLAMA_LIKE),
    _causal_lm("gemma", "GemmaForCausalLM", "GemmaConfig", slow=True, head_dim=8, **LLAMA_LIKE),
    _causal_lm("phi", "PhiForCausalLM", "PhiConfig", slow=True, **LLAMA_LIKE),
    _masked_lm("bert", "BertForMaskedLM", "BertConfig", **BERT_LIKE),
    _masked_lm("roberta", "RobertaForMaskedLM", "RobertaConfig", slow=True,
               pad_token_id=1, **{**BERT_LIKE, "max_position_embeddings": 40}),
    _seq2seq("t5", "T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32,
             d_ff=64, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0),
    _seq2seq("bart", "BartForConditionalGeneration", "BartConfig", slow=True, vocab_size=VOCAB,
             d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
             max_position_embeddings=32),
    _vit(),
    _whisper(),
]

HF_ZOO: dict[str, HFEntry] = {entry.name: entry for entry in ENTRIES}
