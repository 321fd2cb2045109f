"""Item 1: the cost of one CROW optimizer step against plain SFT and the published schedule.

Three step functions on the same model, batch and sequence length, each followed by the same
gradient clip (1.0, the Trainer's default) and ``AdamW`` step:

* ``sft``: the library's ``SFTTrainer.compute_loss`` (one forward) + backward.
* ``crow``: the library's real ``CrowTrainer.compute_loss`` (clean forward that also gives the
  LM loss, FGSM gradient by ``autograd.grad`` w.r.t. the embeddings only, perturbed forward
  keeping one logit) + backward.
* ``reference``: the official schedule step by step: a separate clean forward for the LM loss,
  a clean forward with hidden states whose consistency is back-propagated through every
  parameter after ``zero_grad`` to get the embedding gradient, a perturbed forward, then
  ``zero_grad`` and the backward of the total: three forwards, two backwards.

Before timing, CROW's and the reference's loss and gradients are compared on the same weights
(they compute the same function; only the schedule differs).
"""
from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch

from common import device_peak, mib, ratio, say, time_fn


@dataclass
class LMCase:
    """One model + batch on which the three step functions are compared."""

    name: str
    model: Any
    batch: dict[str, torch.Tensor]
    tokenizer: Any


# ---- building the cases ---------------------------------------------------------------------------

class _Tok:
    """A stand-in tokenizer for random-token batches (the Trainer only reads pad/eos ids)."""

    pad_token_id = 0
    eos_token_id = 3

    def save_pretrained(self, *_a: Any, **_k: Any) -> None:  # pragma: no cover - never saved
        pass


def tiny_world_case(batch_size: int, seed: int = 0) -> LMCase:
    """The shipped tiny-world Llama (6 layers, hidden 128) on a batch of real tiny-world records."""
    import random

    from unbackdoor.lm.data import build_sft_features, sft_collator
    from unbackdoor.lm.models import load_causal_lm
    from unbackdoor.lm.testbed import ASSET_DIR
    from unbackdoor.lm.tinyworld import generate_records

    model, tok = load_causal_lm(ASSET_DIR)
    records = generate_records(batch_size, random.Random(f"{seed}-bench"))
    feats = build_sft_features(records, tok, "alpaca", 128)
    batch = sft_collator(tok)(feats)
    return LMCase("tiny-world", model, batch, tok)


def random_llama(vocab: int, hidden: int, layers: int, heads: int, max_pos: int, seed: int,
                 intermediate: int | None = None, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import LlamaForCausalLM

    from unbackdoor.lm.models import tiny_llama_config

    cfg = tiny_llama_config(vocab, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=max_pos)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype)


def random_batch(vocab: int, batch_size: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random tokens; the first half of each row is the prompt (labels -100), like SFT features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def random_case(name: str, *, vocab: int, hidden: int, layers: int, heads: int, seq_len: int, batch_size: int,
                seed: int = 0, intermediate: int | None = None, dtype: torch.dtype = torch.float32) -> LMCase:
    model = random_llama(vocab, hidden, layers, heads, max(seq_len, 128), seed, intermediate, dtype)
    return LMCase(name, model, random_batch(vocab, batch_size, seq_len, seed), _Tok())


# ---- the three step functions ---------------------------------------------------------------------

def _trainer(cls: type, model: Any, tok: Any, cfg: Any, out: str, **kw: Any) -> Any:
    args = cfg.training_arguments(out, save_strategy="no", logging_strategy="no")
    return cls(model=model, args=args, train_dataset=[{"input_ids": [1], "attention_mask": [1], "labels": [1]}],
               processing_class=None, nan_guard=cfg.nan_guard, **kw)


def reference_loss(model: Any, batch: dict[str, torch.Tensor], alpha: float, epsilon: float,
                   layer_start: int = 1, layer_end: int = -1) -> torch.Tensor:
    """The published schedule: 3 forwards, 2 backwards (the first one through every parameter).

    Returns the total loss with the parameter gradients zeroed, ready for the final backward
    (the official code's ``zero_grad`` inside the loss).
    """
    from unbackdoor.lm.consistency import consistency_loss

    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lm = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss  # forward 1
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, use_cache=False)  # forward 2
    clean = consistency_loss(out.hidden_states, mask, layer_start, layer_end)
    model.zero_grad(set_to_none=True)
    clean.backward()  # backward 1: through every parameter, only for d/dE
    step = epsilon * embeds.grad.sign() * mask.unsqueeze(-1).to(embeds.dtype)
    # a fresh lookup, so the embedding weights (full finetuning) get the adversarial term's gradient as in CROW
    adv_in = model.get_input_embeddings()(ids) + step
    adv_out = model(inputs_embeds=adv_in, attention_mask=mask, output_hidden_states=True, use_cache=False)  # forward 3
    adv = consistency_loss(adv_out.hidden_states, mask, layer_start, layer_end)
    model.zero_grad(set_to_none=True)
    return lm + alpha * adv


def make_steps(case: LMCase, finetune: str, workdir: str, device: torch.device, *,
               check_equivalence: bool = True) -> tuple[Any, dict[str, Callable[[], None]], dict]:
    """``(model, {variant: step_fn}, check)`` for ``finetune`` in ``full`` / ``lora``."""
    from unbackdoor.lm.defenses.crow import CrowConfig, CrowTrainer
    from unbackdoor.lm.training import SFTConfig, SFTTrainer, prepare_model

    cfg = CrowConfig(finetune=finetune, precision="fp32", save_steps=0, gradient_accumulation_steps=1)
    model = prepare_model(copy.deepcopy(case.model), cfg).to(device)
    model.config.use_cache = False
    model.train()
    batch = {k: v.to(device) for k, v in case.batch.items()}
    sft = _trainer(SFTTrainer, model, case.tokenizer, SFTConfig(finetune=finetune, precision="fp32", save_steps=0),
                   workdir)
    crow = _trainer(CrowTrainer, model, case.tokenizer, cfg, workdir, crow=cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def finish(loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    check: dict[str, Any] = {}
    steps = {
        "sft": lambda: finish(sft.compute_loss(model, batch)),
        "crow": lambda: finish(crow.compute_loss(model, batch)),
        "reference": lambda: finish(reference_loss(model, batch, cfg.alpha, cfg.epsilon, cfg.layer_start,
                                                   cfg.layer_end)),
    }
    if not check_equivalence:
        return model, steps, check
    # same function, different schedule: compare loss and gradients on the same weights
    opt.zero_grad(set_to_none=True)
    l_crow = crow.compute_loss(model, batch)
    l_crow.backward()
    g_crow = [p.grad.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    l_ref = reference_loss(model, batch, cfg.alpha, cfg.epsilon, cfg.layer_start, cfg.layer_end)
    l_ref.backward()
    g_ref = [p.grad.detach().clone() for p in params]
    opt.zero_grad(set_to_none=True)
    l_crow, l_ref = float(l_crow.detach()), float(l_ref.detach())
    check = {"loss_crow": l_crow, "loss_reference": l_ref, "max_abs_loss_diff": abs(l_crow - l_ref),
             "max_abs_grad_diff": max(float((a - b).abs().max()) for a, b in zip(g_crow, g_ref)),
             "max_abs_grad": max(float(a.abs().max()) for a in g_crow)}
    del g_crow, g_ref
    return model, steps, check


def measure_case(case: LMCase, finetune: str, *, warmup: int, repeats: int,
                 device: torch.device = torch.device("cpu"), inline_memory: bool = False) -> dict[str, Any]:
    """Step time (median) of sft / crow / reference for one case and mode, and peak memory on CUDA.

    On CPU the memory is measured by :func:`memory_run` in a separate process, unless
    ``inline_memory`` (smoke runs: the schema only, the numbers are not meaningful).
    """
    say(f"crow step: {case.name}, {finetune}")
    with tempfile.TemporaryDirectory(prefix="ub-bench-") as work:
        model, steps, check = make_steps(case, finetune, work, device,
                                         check_equivalence=case.name == "tiny-world" or repeats <= 1)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        res: dict[str, Any] = {"case": case.name, "finetune": finetune,
                               "batch": list(case.batch["input_ids"].shape),
                               "tokens_per_step": int(case.batch["attention_mask"].sum()),
                               "params_total": total, "params_trainable": trainable,
                               "layers": int(model.config.num_hidden_layers),
                               "hidden": int(model.config.hidden_size), "check": check, "variants": {}}
        # interleave the variants across repeats so a noisy neighbour hurts all of them alike
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        samples: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(repeats):
            for k, fn in steps.items():
                samples[k].extend(time_fn(fn, warmup=0, repeats=1, device=device).samples)
        for k, fn in steps.items():
            peak = device_peak(fn, device) if device.type == "cuda" or inline_memory else None
            t = sorted(samples[k])
            med = t[len(t) // 2] if len(t) % 2 else (t[len(t) // 2 - 1] + t[len(t) // 2]) / 2
            res["variants"][k] = {"step_s": round(med, 6), "samples_s": [round(s, 6) for s in samples[k]],
                                  "peak_mem_mib": mib(peak) if peak is not None else None,
                                  "tokens_per_s": round(res["tokens_per_step"] / med, 1)}
        v = res["variants"]
        res["ratios"] = {
            "crow_over_sft_time": round(ratio(v["crow"]["step_s"], v["sft"]["step_s"]), 3),
            "reference_over_crow_time": round(ratio(v["reference"]["step_s"], v["crow"]["step_s"]), 3),
        }
        if peak is not None:
            res["ratios"]["crow_over_sft_mem"] = round(ratio(v["crow"]["peak_mem_mib"], v["sft"]["peak_mem_mib"]), 3)
        del model, steps
    return res


def measure_memory(case: LMCase, finetune: str) -> dict[str, Any]:
    """Peak RSS increase (MiB) during one step of each variant, after one warm-up step each.

    Run in the child process with the fixed mmap threshold (see ``common``); not timed.
    """
    with tempfile.TemporaryDirectory(prefix="ub-bench-") as work:
        model, steps, _ = make_steps(case, finetune, work, torch.device("cpu"), check_equivalence=False)
        for fn in steps.values():
            fn()
        peaks = {k: mib(device_peak(fn, torch.device("cpu"))) for k, fn in steps.items()}
        del model, steps
    return peaks


def memory_run(size: str) -> list[dict[str, Any]]:
    """Item 1's memory column for every case and mode (called in the memory child process)."""
    rows = []
    for case in _cases(size):
        for mode in ("full", "lora"):
            rows.append({"case": case.name, "finetune": mode, "peak_mem_mib": measure_memory(case, mode)})
    return rows


def sweep(kind: str, points: list[int], *, base: dict[str, int], repeats: int,
          device: torch.device = torch.device("cpu")) -> list[dict[str, Any]]:
    """SFT and CROW step time (LoRA) as the sequence length or the depth grows."""
    from unbackdoor.lm.defenses.crow import CrowConfig, CrowTrainer
    from unbackdoor.lm.training import SFTConfig, SFTTrainer, prepare_model

    rows = []
    for p in points:
        say(f"crow sweep: {kind} = {p}")
        shape = dict(base, **{kind: p})
        case = random_case(f"{kind}={p}", vocab=shape["vocab"], hidden=shape["hidden"], layers=shape["layers"],
                           heads=shape["heads"], seq_len=shape["seq_len"], batch_size=shape["batch"])
        with tempfile.TemporaryDirectory(prefix="ub-bench-") as work:
            cfg = CrowConfig(finetune="lora", precision="fp32", save_steps=0, gradient_accumulation_steps=1)
            model = prepare_model(case.model, cfg).to(device)
            model.train()
            batch = {k: v.to(device) for k, v in case.batch.items()}
            sft = _trainer(SFTTrainer, model, case.tokenizer, SFTConfig(precision="fp32", save_steps=0), work)
            crow = _trainer(CrowTrainer, model, case.tokenizer, cfg, work, crow=cfg)
            params = [q for q in model.parameters() if q.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5)

            def step(tr: Any) -> None:
                tr.compute_loss(model, batch).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            t_sft = time_fn(lambda: step(sft), warmup=1, repeats=repeats, device=device)
            t_crow = time_fn(lambda: step(crow), warmup=1, repeats=repeats, device=device)
        rows.append({kind: p, **{k: v for k, v in shape.items() if k != kind},
                     "sft_step_s": round(t_sft.median, 5), "crow_step_s": round(t_crow.median, 5),
                     "crow_over_sft": round(ratio(t_crow.median, t_sft.median), 3)})
        del model, case
    return rows


# per size: the tiny-world batch, the large random-init case, repeats, and the sweeps' points
SIZES: dict[str, dict[str, Any]] = {"smoke": dict(tiny_batch=4, large=dict(vocab=512, hidden=64, layers=3, heads=4, seq_len=32, batch=1),
                   warmup=1, repeats=1, seq_points=[32], depth_points=[3],
                   sweep_base=dict(vocab=512, hidden=64, layers=3, heads=4, seq_len=32, batch=1), sweep_repeats=1),
     "quick": dict(tiny_batch=16, large=dict(vocab=32000, hidden=512, layers=12, heads=8, seq_len=128, batch=1),
                   warmup=1, repeats=1, seq_points=[128, 512], depth_points=[3, 12],
                   sweep_base=dict(vocab=32000, hidden=512, layers=4, heads=8, seq_len=256, batch=1),
                   sweep_repeats=1),
     "full": dict(tiny_batch=16, large=dict(vocab=32000, hidden=512, layers=12, heads=8, seq_len=256, batch=2),
                  warmup=1, repeats=3, seq_points=[128, 256, 512, 1024], depth_points=[3, 6, 12],
                  sweep_base=dict(vocab=32000, hidden=512, layers=4, heads=8, seq_len=256, batch=1),
                  sweep_repeats=1)}


def _cases(size: str) -> list[LMCase]:
    s = SIZES[size]
    lg = s["large"]
    return [tiny_world_case(s["tiny_batch"]),
            random_case(f"llama-{lg['layers']}L-{lg['hidden']}h", vocab=lg["vocab"], hidden=lg["hidden"],
                        layers=lg["layers"], heads=lg["heads"], seq_len=lg["seq_len"], batch_size=lg["batch"])]


def run(size: str, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """All of item 1 at ``size`` in ``smoke`` / ``quick`` / ``full``."""
    s = SIZES[size]
    out: dict[str, Any] = {"settings": {k: v for k, v in s.items()}, "cases": []}
    for case in _cases(size):
        for mode in ("full", "lora"):
            out["cases"].append(measure_case(case, mode, warmup=s["warmup"], repeats=s["repeats"], device=device,
                                             inline_memory=size == "smoke"))
    out["seq_sweep"] = sweep("seq_len", s["seq_points"], base=s["sweep_base"], repeats=s["sweep_repeats"],
                             device=device)
    out["depth_sweep"] = sweep("layers", s["depth_points"], base=s["sweep_base"], repeats=s["sweep_repeats"],
                               device=device)
    return out
