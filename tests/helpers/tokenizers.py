"""A word-level tokenizer for the tiny random checkpoints: token i is the word ``w{i}``; special tokens at the
ids the tiny checkpoints use (mask 511, stop 510)."""
import json
import os


def write_word_tokenizer(folder, vocab=512, mask=511, stop=510, pad=0):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    names = {i: f"w{i}" for i in range(vocab)}
    names[mask], names[stop], names[pad] = "|<MASK>|", "<|im_end|>", "<|endoftext|>"
    tok = Tokenizer(models.WordLevel({v: k for k, v in names.items()}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(["|<MASK>|", "<|im_end|>", "<|endoftext|>"])
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}, f)
    return folder
