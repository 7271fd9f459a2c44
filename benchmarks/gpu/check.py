"""One prepared GPU check (``benchmarks/gpu/check.sh``): step time, CUDA memory, two short cells.

Writes one JSON (``--out``) with:

* ``step``: the project's LoRA step (``apply_lora``, unmerged expert LoRA, bf16 autocast on CUDA
  via ``forward_context``) of ``smollm2-moe-8e`` next to the dense SmolLM2 + peft LoRA step
  (r = 8, same batch), interleaved (``benchmarks/models/lora_step.py``'s ``Variant``);
* ``memory`` (CUDA only): the memory model's prediction for that step
  (``fedmoe.moe.memory.estimate_for_model``, fp32 and bf16 activations) next to
  ``torch.cuda.max_memory_allocated`` over the MoE steps;
* ``cells``: one short FedMoE and one FedProx run (``configs/tiny.toml`` on the real data in
  ``../shared/data``, the model swapped for ``--model``) — wall time and final scores.

``--tiny`` runs everything at toy size on CPU (a Mixtral/Mistral pair built from their config
classes, ``tiny-mixtral`` cells): the test suite runs it so the script is known to work before a
GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fedmoe

fedmoe.apply_process_policy()  # the CLI's thread/allocator policy, before torch

# isort: split
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "models"))
from common import random_batch  # noqa: E402
from lora_step import ALPHA, R, Variant, _dense_lora  # noqa: E402

from fedmoe.moe.lora import apply_lora  # noqa: E402


def models(tiny: bool):
    if tiny:
        from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

        dims = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(**dims)), MixtralForCausalLM(
            MixtralConfig(**dims, num_local_experts=4, num_experts_per_tok=2))
    from fedmoe.moe import presets

    dense, _ = presets.smollm2_dense()
    moe, _ = presets.build_pretrained_preset("smollm2-moe-8e")
    return dense, moe


def step_check(tiny: bool, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    dense, moe = models(tiny)
    vocab = moe.config.vocab_size
    data = random_batch(vocab, batch, seq, seed=2)
    predicted = {}
    if device.type == "cuda":
        from fedmoe.moe.memory import estimate_for_model

        predicted = {"fp32_activations": estimate_for_model(moe, batch, seq, "lora", R),
                     "bf16_activations": estimate_for_model(moe, batch, seq, "lora", R, act_bytes=2)}
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    d = Variant("dense", _dense_lora(dense, attn + ["gate_proj", "up_proj", "down_proj"]), "lm", data, False, device)
    m = Variant("moe", apply_lora(moe, R, ALPHA), "lm", data, True, device)
    for v in (d, m):
        v.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        d.times.append(d.step())
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        m.times.append(m.step())
    out = {"batch": batch, "seq": seq, "steps": steps, "dense_step_s": statistics.median(d.times),
           "moe_step_s": statistics.median(m.times)}
    out["ratio"] = out["moe_step_s"] / out["dense_step_s"]
    if device.type == "cuda":
        out["memory"] = {"predicted": predicted, "max_memory_allocated": torch.cuda.max_memory_allocated(),
                         "allocated_before_moe_steps_incl_dense": base}
    del d, m
    return out


def data_dir() -> Path:
    """The shared real data: ``shared/data`` inside the checkout, else beside it."""
    inside = REPO / "shared" / "data"
    return inside if inside.is_dir() else REPO.parent / "shared" / "data"


def cell(algorithm: str, model: str, device: str, out_dir: Path, tiny: bool) -> dict:
    sets = [f'model.name="{model}"', f'algorithm="{algorithm}"', f'engine.device="{device}"',
            "engine.checkpoint_every=0", f'data.data_dir="{data_dir()}"']
    sets += (["data.max_examples_per_task=36", "setting.num_clients=6", "federation.clients_per_round=3",
              "fedmoe.stage1_rounds=1", "federation.rounds=1", "train.max_local_steps=1", "engine.measure_memory=false"]
             if tiny else ["data.max_examples_per_task=200", "setting.num_clients=6", "federation.clients_per_round=3",
                           "fedmoe.stage1_rounds=1", "federation.rounds=2", "train.max_local_steps=8"])
    cmd = [sys.executable, "-m", "fedmoe.cli", "run", str(REPO / "configs" / "tiny.toml"), "--out", str(out_dir)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    res = {"algorithm": algorithm, "model": model, "rc": proc.returncode, "wall_s": time.perf_counter() - t0,
           "command": " ".join(cmd)}
    summary = out_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        res["scores"] = s.get("scores")
        res["rounds"] = s.get("rounds")
    else:
        res["stderr_tail"] = proc.stderr[-2000:]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--tiny", action="store_true", help="toy size on CPU (what the test suite runs)")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        print("no CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    result: dict = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "tiny": args.tiny}
    b, s = (2, 16) if args.tiny else (8, 256)
    result["step"] = step_check(args.tiny, device, b, s, 2 if args.tiny else args.steps)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = "tiny-mixtral" if args.tiny else "smollm2-moe-8e"
    result["cells"] = [cell(a, model, device.type, out.parent / f"cell_{a}", args.tiny) for a in ("fedmoe", "fedprox")]
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if all(c["rc"] == 0 for c in result["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
