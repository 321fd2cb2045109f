"""CleanGen's replacement rule (Li et al., EMNLP 2024), as a pure function of probabilities.

The suspect drafts ``k`` tokens greedily; the reference model scores the same positions. A
drafted token ``t_i`` is suspicious when the suspect rates it far more likely than the
reference does: ``s_i = P_suspect(t_i | prefix) / P_ref(t_i | prefix) >= alpha``. The first
suspicious token is replaced by the reference's own most likely token at that position and the
drafted tokens after it are discarded (they were conditioned on the suspicious one); with none
suspicious all ``k`` are kept. The paper's defaults: ``alpha = 20``, ``k = 4``.
"""
from __future__ import annotations

from typing import Sequence


def suspicion(p_suspect: float, p_reference: float) -> float:
    """``P_suspect / P_ref`` (infinite when the reference gives the token probability 0)."""
    return float("inf") if p_reference <= 0 else p_suspect / p_reference


def accept_draft(draft: Sequence[int], p_suspect: Sequence[float], p_reference: Sequence[float],
                 reference_choice: Sequence[int], alpha: float) -> tuple[list[int], int | None]:
    """``(tokens to append, index replaced or None)`` for one drafted window.

    ``p_suspect[i]`` and ``p_reference[i]`` are the two models' probabilities of ``draft[i]``
    after the same prefix; ``reference_choice[i]`` the reference's most likely token there.
    """
    for i, tok in enumerate(draft):
        if suspicion(p_suspect[i], p_reference[i]) >= alpha:
            return [*draft[:i], int(reference_choice[i])], i
    return [int(t) for t in draft], None


__all__ = ["accept_draft", "suspicion"]
