"""CleanGen (Li et al., EMNLP 2024): decoding-time defense against the suspect's backdoored tokens.

Needs the clean base (reference) model, no data and no training. The defended "model" is a
:class:`~unbackdoor.lm.decoding_defense.DecodingDefense`: its ``generate`` runs CleanGen (the suspect drafts
``k`` tokens, a drafted token the suspect rates ``alpha`` times more likely than the reference is
replaced by the reference's choice), its ``forward`` is the suspect's. Evaluation therefore measures
CleanGen's generations with the usual metrics; target loss, perplexity and the layer profile stay the
suspect's (weights unchanged). Saved as a small folder (``decoding_defense.json`` naming both model
folders and the settings, plus the tokenizer) that ``unbackdoor lm evaluate --model RUN/model`` loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ....core.defense import DefenseSpec, Needs
from ....core.errors import ModelError
from .decoding import CleanGenConfig, CleanGenModel
from .rule import accept_draft, suspicion

__all__ = ["CleanGenConfig", "CleanGenModel", "SPEC", "accept_draft", "run_cleangen", "suspicion"]


def _abs(p: Any) -> str | None:
    return str(Path(p).resolve()) if p else None


def run_cleangen(model: Any, tokenizer: Any, clean: Sequence[dict], cfg: CleanGenConfig, ctx: Any) -> Any:
    """Wrap the suspect and the reference (``--base-model``) into a CleanGen decoder."""
    reference, ref_tok = ctx.load_base_model()
    if len(ref_tok) != len(tokenizer) or ref_tok.get_vocab() != tokenizer.get_vocab():
        raise ModelError("the reference model's tokenizer differs from the suspect's: CleanGen compares the two "
                         "models' probabilities token by token", where="--base-model",
                         fix="pass a reference model with the suspect's tokenizer (its base model)")
    sources = {"suspect": {"model": _abs(ctx.model_path), "adapter": _abs(ctx.adapter_path)},
               "reference": {"model": _abs(ctx.base_model_path), "adapter": None}}
    if ctx.model_path is None:
        sources["suspect"] = None
    wrapped = CleanGenModel(model.eval(), reference.eval(), cfg, sources=sources)
    ctx.record.update({"decoding": "cleangen", "alpha": cfg.alpha, "k": cfg.k,
                       "reference": sources["reference"]["model"]})
    # the decoder's counters live in the record, so metrics.json gets them for the evaluation's generations
    wrapped.stats = ctx.record.setdefault("generation", {})
    return wrapped.eval()


SPEC = DefenseSpec(
    name="cleangen", kind="lm", config=CleanGenConfig, run=run_cleangen,
    needs=Needs(trains=False, clean_data=False, base_model=True),
    summary="CleanGen decoding: replace drafted tokens the suspect rates >= alpha x likelier than the base model",
    paper="CleanGen: Mitigating Backdoor Attacks for Generation Tasks in Large Language Models (EMNLP 2024)",
)
