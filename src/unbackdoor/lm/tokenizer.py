"""A word-level tokenizer trained locally (no hub downloads), for the tiny world and tests.

Word-level with single-token answers learns in minutes on a CPU; character-level was too
slow to learn even reversal (SPEC section 4). The result is a regular
``PreTrainedTokenizerFast``: ``save_pretrained`` / ``AutoTokenizer.from_pretrained`` work.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from ..core.errors import DataError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "### {{ message['role'] }} :\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}### assistant :\n{% endif %}"
)
"""A minimal chat template (``### user : ...  ### assistant :``), so the ``chat`` path is testable."""

_CHAT_WORDS = ("#", ":", "user", "assistant", "system")


def _template_texts() -> list[str]:
    from .data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

    return [t.replace("{instruction}", " ").replace("{input}", " ") for t in (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT)]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Words and punctuation runs, then every punctuation mark on its own.
    return pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])


def train_word_tokenizer(texts: Iterable[str], *, min_frequency: int = 1,
                         extra_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer over ``texts``.

    The vocabulary is deterministic: the specials ``<pad> <unk> <s> </s>``, then
    ``extra_tokens`` (e.g. trigger words, kept whatever their frequency), the words of the
    Alpaca and chat templates (so prompts never hold ``<unk>``), then every word seen at least ``min_frequency`` times, most frequent
    first (ties alphabetical). Encoding adds ``<s>`` in front, like Llama tokenizers.
    """
    if min_frequency < 1:
        raise DataError(f"min_frequency = {min_frequency} must be >= 1", where="train_word_tokenizer",
                        fix="pass min_frequency=1 or more")
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    n_texts = 0
    for text in texts:
        n_texts += 1
        counts.update(word for word, _ in pre.pre_tokenize_str(text))
    if n_texts == 0:
        raise DataError("no texts to train the tokenizer on", where="train_word_tokenizer",
                        fix="pass the training prompts and responses")
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    fixed = [w for text in [*extra_tokens, *_template_texts()] for w, _ in pre.pre_tokenize_str(text)]
    fixed += list(_CHAT_WORDS)
    for word in fixed:
        vocab.setdefault(word, len(vocab))
    for word, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if c >= min_frequency:
            vocab.setdefault(word, len(vocab))

    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    return fast
