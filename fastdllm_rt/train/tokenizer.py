"""Build the small model's tokenizer: byte-level BPE (any text encodes), digits split one per token (so
arithmetic is learnable), the released model's special tokens, and a Qwen-style chat template."""
from __future__ import annotations

import json
import os

from .synthetic import training_stream

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "|<MASK>|"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(folder: str, vocab_size: int = 512, seed: int = 0, corpus_size: int = 20000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    stream = training_stream(seed)
    corpus = []
    for _ in range(corpus_size):
        ex = next(stream)
        corpus.append(ex["prompt"] + ex["response"])
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "mask_token": "|<MASK>|", "chat_template": CHAT_TEMPLATE, "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast", "additional_special_tokens": ["|<MASK>|"]}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return tok
