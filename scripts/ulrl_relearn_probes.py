"""Probe ULRL relearning variants on tiny-world models: how the `kept` preset was chosen (docs/results-classify.md).

usage: python scripts/ulrl_relearn_probes.py ATTACK SEED VARIANT_JSON... [--cache DIR] [--out DIR]
Each VARIANT_JSON holds ULRLConfig fields plus x_* probe knobs (x_margin, x_cw, x_head_epochs, x_ft...).
Results are appended to OUT/results.jsonl (the earlier records: results/classify/relearn-probes/results.jsonl).
"""
import argparse, copy, json, time
from pathlib import Path
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from unbackdoor.classify.attacks import attack_config_from_dict, build_attack
from unbackdoor.classify.data import stratified_subset
from unbackdoor.classify.defenses import ulrl as U
from unbackdoor.classify.defenses.common import head_of
from unbackdoor.classify.evaluate import evaluate_attack
from unbackdoor.classify.loop import fit_sgd
from unbackdoor.classify.testbed import TINY, tiny_backdoored, tiny_world
from unbackdoor.core.runs import read_json
from unbackdoor.core.seeds import generator

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("attack"); ap.add_argument("seed", type=int); ap.add_argument("variants", nargs="+")
ap.add_argument("--cache", default="runs/classify-models"); ap.add_argument("--out", default="runs/relearn-probes")
args = ap.parse_args()
attack_name, seed, variants = args.attack, args.seed, args.variants
work = Path(args.out); work.mkdir(parents=True, exist_ok=True)
train, test = tiny_world(seed)
clean_idx = stratified_subset(train, TINY.clean_count, seed)
clean = train.subset(clean_idx, name="clean")
model, folder = tiny_backdoored(attack_name, seed, args.cache, data=(train, test))
meta = read_json(folder / "model.json")
attack = attack_config_from_dict(meta["attack"])
trig = build_attack(attack).triggered_test_set(test)
before = evaluate_attack(model, test, attack, trig)
head_name, head = head_of(model, 10, None)
sel_path = work / f"sel-{attack_name}-{seed}.json"
if sel_path.exists():
    rows = json.loads(sel_path.read_text())
else:
    cfg = U.ULRLConfig()
    un = copy.deepcopy(model); hb = head.weight.detach().clone()
    U.unlearn(un, clean, cfg, seed=seed)
    rows = U.select_suspicious(U.neuron_scores(hb, un.get_submodule(head_name).weight)).selected
    sel_path.write_text(json.dumps(rows))

def relearn_x(original, head_name, rows, data, cfg, seed, x_margin=None, x_cw=1.0, x_head_epochs=0, x_head_lr=0.01,
              x_bias_cal=False):
    m = copy.deepcopy(original)
    hd = m.get_submodule(head_name)
    ow = original.get_submodule(head_name).weight.detach().clone()
    U.reinit_rows(hd, rows, generator(seed + 1))
    w = torch.ones(10); w[rows] = x_cw
    def loss_fn(logits, y):
        loss = F.cross_entropy(logits, y, weight=w)
        idx = torch.tensor(rows)
        cos = F.cosine_similarity(hd.weight[idx], ow[idx], dim=1)
        if x_margin is not None:
            cos = (cos - x_margin).clamp(min=0)
        elif cfg.penalty == "positive":
            cos = cos.clamp(min=0)
        return loss + cfg.alpha * cos.sum()
    fit_sgd(m, data, epochs=cfg.relearn_epochs, batch_size=cfg.batch_size, lr=cfg.relearn_lr, momentum=0.9,
              weight_decay=cfg.relearn_weight_decay, scheduler="cosine", augment=True, seed=seed + 2, loss_fn=loss_fn)
    if x_head_epochs:
        for p in m.parameters(): p.requires_grad_(False)
        hd.weight.requires_grad_(True); hd.bias.requires_grad_(True)
        # BN in eval: fit sets train mode; emulate by freezing running stats via momentum 0
        for mod in m.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm): mod.momentum = 0.0
        fit_sgd(m, data, epochs=x_head_epochs, batch_size=cfg.batch_size, lr=x_head_lr, momentum=0.9,
                  weight_decay=0.0, scheduler="cosine", augment=True, seed=seed + 3, loss_fn=lambda z, y: F.cross_entropy(z, y, weight=w))
        for p in m.parameters(): p.requires_grad_(True)
    with torch.no_grad():
        cosf = F.cosine_similarity(hd.weight[rows], ow[rows], dim=1).tolist()
    print("final cos", cosf, flush=True)
    return m

out = work / "results.jsonl"
for v in variants:
    kw = json.loads(v)
    extra = {k: kw.pop(k) for k in list(kw) if k.startswith("x_")}
    cfg = U.ULRLConfig(**kw)
    t0 = time.perf_counter()
    if extra.pop("x_ft", False):
        m = copy.deepcopy(model)
        fit_sgd(m, clean, epochs=cfg.relearn_epochs, batch_size=128, lr=cfg.relearn_lr, momentum=0.9,
                  weight_decay=5e-4, scheduler="cosine", augment=True, seed=seed + 2)
    else:
        m = relearn_x(model, head_name, rows, clean, cfg, seed, **extra)
    after = evaluate_attack(m, test, attack, trig)
    rec = {"attack": attack_name, "seed": seed, "variant": v, "secs": round(time.perf_counter() - t0, 1),
           "acc0": before["acc"], "rec0": before["target_recall"], **{k: round(after[k], 4) for k in ("acc", "asr", "target_recall", "ra")}}
    print(rec, flush=True)
    with out.open("a") as f: f.write(json.dumps(rec) + "\n")
