"""A tiny BERT sentence-transformers directory built in-process, so tests need no model download."""

from __future__ import annotations

import json
import string
from pathlib import Path

WORDS = (
    "the a an and or of to in on for with is are was were be been it this that these those he she they "
    "we you i my your his her their our man woman men women child children dog dogs cat cats horse bird "
    "car bus train plane road street house room table chair bed door window food water coffee tea bread "
    "eats eat ate runs run ran walks walk plays play played sits sit sleeps sleep reads read writes "
    "drives rides swims jumps looks talks sings dances cooks good bad big small happy sad red blue green "
    "black white young old new fast slow hot cold beautiful quick brown fox lazy over under near far "
    "playing walking running eating reading sitting sleeping guitar piano ball game music song book "
    "movie film story park beach city country world day night morning today people person group "
    "not no yes very really great terrible love hate like card bank money account transfer balance"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_model(dest: Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 2,
                     max_seq_length: int = 64, pooling: str = "mean", seed: int = 0) -> Path:
    """Write a randomly initialized tiny BERT in sentence-transformers layout to `dest`."""
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel

    from embedline import artifact as art

    dest.mkdir(parents=True, exist_ok=True)
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab_list = SPECIAL + sorted(set(WORDS)) + pieces + ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}

    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": max_seq_length,
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }))

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=hidden_size * 4,
        max_position_embeddings=max(128, max_seq_length),
    )
    BertModel(config).save_pretrained(str(dest), safe_serialization=True)
    art.write_sentence_transformers_files(dest, pooling, max_seq_length, hidden_size)
    return dest
