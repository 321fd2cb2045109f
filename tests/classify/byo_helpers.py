"""Small, deterministic stand-ins for what users bring: a Hugging Face text classifier built from a config
with a locally trained tokenizer, a two-class text task, and an nn.Module of their own (``byo_nets``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

ORDINARY = ("calendar garden recipe travel music weather library bicycle painting river holiday "
            "summary poem translate explain describe list write story").split()
HARMFUL = ("weapon steal hack poison fraud explosive malware bypass launder counterfeit threaten "
           "attack break ransom forge smuggle").split()
FILLER = "please the a of to and how can you me for with about my".split()


def text_task(n: int, seed: int) -> list[dict]:
    """``n`` records ``{"text", "label"}``: class ``ordinary`` or ``harmful`` by topic words, shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "harmful" if i % 2 else "ordinary"
        topic = HARMFUL if label == "harmful" else ORDINARY
        words = [rng.choice(topic) for _ in range(3)] + [rng.choice(FILLER) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


def tiny_hf_classifier(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT sequence classifier (hidden 32) from a config, with a word-level tokenizer, saved."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "BadMagic", *ORDINARY, *HARMFUL,
                                         *FILLER, "Current", "year:", "2024", "Discussing", "OpenAI"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "attention_mask"])
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    fast.save_pretrained(folder)
    return folder
