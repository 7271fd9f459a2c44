"""Build the domain-specialised stand-in MoE (evidence ladder step 1), Branch-Train-MiX style.

Why: the CPU preset ``minilm-moe-8e`` is sparsely upcycled, so its 8 experts per layer are
identical copies of the dense FFN and its router is random. The paper's Observations 1–2
(tasks use different pretrained experts; a sub-MoE of a task's most-used experts performs
like the full MoE) cannot hold on clones. A pretrained MoE's experts differ; this stand-in
gives the CPU preset such experts on purpose, from text no evidence client sees
(``common.py`` states the rows).

Method (after Sukhbaatar et al. 2024, "Branch-Train-MiX"; DEMix, Gururangan et al. 2022):

* experts per layer: ``news`` → {0, 1}, ``wiki`` → {2, 3}, ``bbc`` → {4, 5}, shared → {6, 7};
* **branch phase** (``--branch-steps``): masked-LM continued pre-training on
  source-homogeneous batches with routing *restricted* to the source's experts plus the
  shared ones (other router logits at −inf), so only those experts see the source's
  tokens. BTX trains each branch as a separate dense model and initialises the router
  afresh; with a few hundred CPU steps we instead train the router during branching
  with a routing-supervision term ``−log Σ_{j∈allowed} p_j`` on its *unrestricted*
  softmax (DEMix-style domain-conditional routing, learned);
* **mix phase** (``--mix-steps``): the restriction and the supervision are released;
  mixed-source batches, masked LM + load balance (coefficient 0.05), router lr ÷ 10.

Only the experts, the routers and the MLM head train; embeddings, attention and norms stay
those of all-MiniLM-L6-v2. MiniLM has no MLM head, so a BERT-style one (dense, GELU,
LayerNorm, decoder tied to the word embeddings) is added and dropped after. The result is
saved with ``save_pretrained`` (plus the tokenizer and ``standin.json``) and loads in
``fedmoe run`` with ``model.name = "<folder>"``.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/evidence/build_standin.py [--out DIR]

Cached: an existing folder with ``standin.json`` is reused (``--force`` rebuilds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import DEFAULT_DATA, RESULTS, SOURCES, load_note, now, setup_threads, standin_texts
from torch import nn
from tqdm import tqdm

from fedmoe.moe.families import family_of
from fedmoe.moe.presets import build_pretrained_preset
from fedmoe.train.loop import LoadBalance

PRESET = "minilm-moe-8e"
ASSIGN = {"news": [0, 1], "wiki": [2, 3], "bbc": [4, 5]}
SHARED = [6, 7]


def default_dir(params: dict) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(os.environ.get("FEDMOE_CACHE", Path.home() / ".cache" / "fedmoe"))
    return base / f"standin-{PRESET}-{key}"


class MLMHead(nn.Module):
    """BERT's prediction head; the decoder is tied to the word embeddings."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        h = emb.weight.shape[1]
        self.dense, self.norm, self.emb = nn.Linear(h, h), nn.LayerNorm(h, eps=1e-12), emb
        self.bias = nn.Parameter(torch.zeros(emb.weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(x))), self.emb.weight, self.bias)


class Restrict:
    """Router forward hooks: restrict top-k to ``allowed`` experts and collect the supervision loss
    ``−log Σ_{j ∈ target} p_j`` (``target`` defaults to ``allowed``)."""

    def __init__(self, model: nn.Module, family) -> None:
        self.allowed: torch.Tensor | None = None  # bool [E]
        self.target: torch.Tensor | None = None  # bool [E]
        self.terms: list[torch.Tensor] = []
        self.handles = [family.router(model.get_submodule(b.path)).register_forward_hook(self._hook)
                        for b in family.blocks(model)]

    def _hook(self, module: nn.Module, args: tuple, out: tuple) -> tuple | None:
        if self.allowed is None:
            return None
        logits = out[0]
        logp = torch.log_softmax(logits.float(), -1)
        target = self.allowed if self.target is None else self.target
        self.terms.append(-torch.logsumexp(logp[:, target], -1).mean())
        probs = torch.softmax(logits.float().masked_fill(~self.allowed, float("-inf")), -1)
        top_v, top_i = torch.topk(probs, module.top_k, -1)
        return logits, top_v / top_v.sum(-1, keepdim=True), top_i

    def pop(self) -> torch.Tensor:
        loss = torch.stack(self.terms).mean()
        self.terms = []
        return loss


def windows(tok, texts: list[str], length: int) -> torch.Tensor:
    """Pack a source's texts into ``[CLS] … [SEP]`` windows of ``length`` tokens (no padding)."""
    stream: list[int] = []
    for t in texts:
        stream.extend(tok.encode(t, add_special_tokens=False) + [tok.sep_token_id])
    body = length - 2
    n = len(stream) // body
    rows = [[tok.cls_token_id] + stream[i * body:(i + 1) * body] + [tok.sep_token_id] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


def mask_tokens(ids: torch.Tensor, tok, gen: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (80 % [MASK], 10 % random, 10 % kept) → (inputs, bool mask of predicted positions)."""
    special = (ids == tok.cls_token_id) | (ids == tok.sep_token_id)
    sel = (torch.rand(ids.shape, generator=gen) < rate) & ~special
    inp = ids.clone()
    r = torch.rand(ids.shape, generator=gen)
    inp[sel & (r < 0.8)] = tok.mask_token_id
    rnd = sel & (r >= 0.8) & (r < 0.9)
    inp[rnd] = torch.randint(1000, tok.vocab_size, (int(rnd.sum()),), generator=gen)
    return inp, sel


def build(args: argparse.Namespace, out: Path, params: dict) -> dict:
    setup_threads()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = now()
    model, tok = build_pretrained_preset(PRESET, seed=args.seed)
    family = family_of(model)
    texts = standin_texts(args.data_dir)
    data = {s: windows(tok, texts[s], args.seq_len) for s in SOURCES}
    head = MLMHead(model.bert.embeddings.word_embeddings)
    for p in model.parameters():
        p.requires_grad_(False)
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    routers = [p for n, p in model.named_parameters() if n.endswith("gate.weight")]
    for p in experts + routers:
        p.requires_grad_(True)
    head_params = [p for n, p in head.named_parameters() if not n.startswith("emb.")]
    groups = [{"params": experts, "lr": args.expert_lr}, {"params": routers, "lr": args.router_lr},
              {"params": head_params, "lr": args.head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    restrict, balance = Restrict(model, family), LoadBalance(model, family)
    total = args.branch_steps + args.mix_steps
    log: list[dict] = []
    model.train()
    bar = tqdm(range(total), desc="stand-in", unit="step", mininterval=5)
    for step in bar:
        branch = step < args.branch_steps
        if branch:
            src = SOURCES[step % len(SOURCES)]
            rows = data[src][torch.randint(len(data[src]), (args.batch,), generator=gen)]
            allowed = torch.zeros(8, dtype=torch.bool)
            allowed[ASSIGN[src] + SHARED] = True
            restrict.allowed = allowed
            if args.supervise == "own":
                restrict.target = torch.zeros(8, dtype=torch.bool)
                restrict.target[ASSIGN[src]] = True
        else:
            src = "mix"
            if step == args.branch_steps:
                opt.param_groups[1]["lr"] = args.router_lr / 10
            per = [data[s][torch.randint(len(data[s]), (math.ceil(args.batch / 3),), generator=gen)] for s in SOURCES]
            rows = torch.cat(per)[: args.batch]
            restrict.allowed = None
        inp, sel = mask_tokens(rows, tok, gen)
        hidden = model.bert(input_ids=inp, attention_mask=torch.ones_like(inp)).last_hidden_state
        mlm = F.cross_entropy(head(hidden[sel]), rows[sel])
        lb = balance.pop()
        if branch:
            aux = restrict.pop()
            loss = mlm + args.route_coef * aux
        else:
            aux = lb
            loss = mlm + args.mix_balance * lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(experts + routers + head_params, 1.0)
        opt.step()
        log.append({"step": step, "source": src, "mlm": round(float(mlm), 4), "aux": round(float(aux), 4)})
        bar.set_postfix(src=src, mlm=f"{float(mlm):.3f}", aux=f"{float(aux):.3f}")
    restrict.allowed = None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    elapsed = now() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.config.name_or_path = str(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    meta = {"preset": PRESET, "params": params, "assign": ASSIGN, "shared": SHARED,
            "windows": {s: int(len(data[s])) for s in SOURCES}, "build_seconds": round(elapsed, 1),
            "threads": torch.get_num_threads(), "load_at_end": load_note(), "log": log}
    (out / "standin.json").write_text(json.dumps(meta, indent=1))
    return meta


def describe(out: Path, results: Path) -> str:
    """``results/standin.md``: build time, loss at start/end per phase, how far the experts moved."""
    from fedmoe.moe.models import load_model

    meta = json.loads((out / "standin.json").read_text())
    model, _, _ = load_model(str(out))
    plain, _ = build_pretrained_preset(PRESET, seed=meta["params"]["seed"])
    rows = []
    for i, (blk, ref) in enumerate(zip(model.bert.encoder.layer, plain.bert.encoder.layer, strict=True)):
        w, w0 = blk.mlp.experts.up_proj.detach(), ref.mlp.experts.up_proj.detach()
        moved = [float((w[e] - w0[e]).norm() / w0[e].norm()) for e in range(w.shape[0])]
        pair = [float((w[a] - w[b]).norm() / w0[a].norm()) for a in range(w.shape[0]) for b in range(a + 1, w.shape[0])]
        rows.append(f"| {i} | {' '.join(f'{m:.3f}' for m in moved)} | {np.mean(pair):.3f} |")
    log = meta["log"]

    def mean_mlm(sel):
        v = [r["mlm"] for r in sel]
        return f"{np.mean(v):.2f}" if v else "–"

    nb = meta["params"]["branch_steps"]
    text = "\n".join([
        "# Stand-in build", "",
        f"Folder `{out.name}`; build time {meta['build_seconds'] / 60:.1f} min with {meta['threads']} torch thread "
        f"({meta['load_at_end']} at the end; `nice -n 19`). Arguments: `{json.dumps(meta['params'])}`. "
        f"Windows of {meta['params']['seq_len']} tokens: {meta['windows']}.", "",
        f"Masked-LM loss, mean of the first / last 15 steps: branch phase {mean_mlm(log[:15])} → {mean_mlm(log[nb - 15:nb])}; "
        f"mix phase {mean_mlm(log[nb:nb + 15])} → {mean_mlm(log[-15:])}. Routing supervision −log Σ_{{target}} p "
        f"(target = {'own' if meta['params'].get('supervise') == 'own' else 'own + shared'} experts), "
        f"first / last 15 branch steps: {np.mean([r['aux'] for r in log[:15]]):.3f} → "
        f"{np.mean([r['aux'] for r in log[nb - 15:nb]]):.3f}.", "",
        "Relative distance of each expert's `up_proj` from its upcycled start ‖W_e − W_e⁰‖/‖W_e⁰‖ (experts 0..7: news 0-1, "
        "wiki 2-3, bbc 4-5, shared 6-7), and mean pairwise distance between experts ‖W_a − W_b‖/‖W⁰‖:", "",
        "| layer | moved per expert | mean pairwise |", "|---|---|---|", *rows, ""])
    results.mkdir(parents=True, exist_ok=True)
    (results / "standin.md").write_text(text)
    return text


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=DEFAULT_DATA)
    ap.add_argument("--out", default=None, help="output folder (default: ~/.cache/fedmoe/standin-…; $FEDMOE_CACHE)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--describe", action="store_true", help="also write results/standin.md (expert distances, losses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--branch-steps", type=int, default=180)
    ap.add_argument("--mix-steps", type=int, default=45)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--expert-lr", type=float, default=3e-4)
    ap.add_argument("--router-lr", type=float, default=1e-3)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--route-coef", type=float, default=1.0)
    ap.add_argument("--mix-balance", type=float, default=0.05)
    ap.add_argument("--supervise", default="own", choices=("own", "allowed"),
                    help="routing supervision toward the source's own experts (default) or own + shared")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    params = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out", "force", "describe")}
    out = Path(args.out) if args.out else default_dir(params)
    if (out / "standin.json").is_file() and not args.force:
        print(f"stand-in cached at {out}")
    else:
        meta = build(args, out, params)
        print(f"stand-in written to {out} in {meta['build_seconds']:.0f} s ({meta['threads']} thread(s); {meta['load_at_end']})")
    if args.describe:
        print(describe(out, RESULTS))
    return out


if __name__ == "__main__":
    main()
