#!/usr/bin/env python3
"""The Hugging Face counterpart of `llmft bench`: the same model shape with
random weights in transformers (bf16, sdpa attention), QLoRA through
bitsandbytes NF4 (Linear4bit, bf16 compute), PEFT LoRA on all 7 linears,
gradient checkpointing (use_reentrant=False), torch AdamW on the adapter,
bf16 autocast and gradient clipping at 1.0 as `Trainer(bf16=True)` runs it.
Prints one JSON object with the keys `llmft bench` prints.

    python3 scripts/bench/hf_train_bench.py --model llama3-8b --train-type qlora \
        --seq 2048 --micro-batch 2 [--layers N] [--steps 12] [--warmup 3] [--json FILE]

Train types: qlora (NF4 base), bnb_dora (NF4 base + DoRA), lora (bf16 base).
Peak memory is torch.cuda.max_memory_allocated over the training steps and
the resident weights; the bf16 copy the NF4 weights are quantized from is
freed before the peak is reset (transformers' own loader never holds it).
"""
import argparse
import gc
import json
import statistics
import sys
import time

import torch

GIB = float(1 << 30)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# config.json fields of the shapes `llmft bench --model` names.
PRESETS = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072),
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       rope_theta=500000.0, rope_scaling=LLAMA3_ROPE, max_position_embeddings=131072),
    "llama2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      rope_theta=10000.0, max_position_embeddings=4096),
    "llama2-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       rope_theta=10000.0, max_position_embeddings=4096),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       rope_theta=1000000.0, max_position_embeddings=32768),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FORMULA = ("flops_per_token = 6*N + 12*L*q_dim*seq (N = decoder linear + LM head weights; the PaLM-style "
           "count used for MFU); flops_per_token_frozen_base = 4*(N - N_trainable) + 6*N_trainable + "
           "12*L*q_dim*seq (no weight gradients of a frozen base); recompute under checkpointing not counted")


def build_config(name, layers):
    from transformers import LlamaConfig, Qwen2Config

    if name not in PRESETS:
        sys.exit(f"error: --model `{name}` is not one of {', '.join(PRESETS)}")
    d = dict(PRESETS[name])
    kind = d.pop("model_type")
    if layers:
        d["num_hidden_layers"] = layers
    d.update(rms_norm_eps=1e-5 if kind == "llama" else 1e-6, initializer_range=0.02,
             tie_word_embeddings=False, use_cache=False, attention_dropout=0.0)
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**d)


def random_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("cuda"):
        try:
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
        except TypeError:
            m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    return m


def quantize_decoder_nf4(model):
    """Replaces every nn.Linear of the decoder by a bitsandbytes NF4
    Linear4bit quantized (on the GPU) from its bf16 weight."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for cname, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear:
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=torch.bfloat16, compress_statistics=False,
                                      quant_type="nf4", quant_storage=torch.uint8, device="meta")
                w = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=False,
                                      quant_type="nf4", quant_storage=torch.uint8, module=q)
                q.weight = w.to("cuda")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, cname, q)
                del child, w
    try:
        model.is_loaded_in_4bit = True  # PEFT then wraps the layers with its bnb LoRA layer
    except AttributeError:
        pass


def gemm_ceiling(n):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        c = a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(5):
            c = a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t) / 5)
    del a, b, c
    return 2 * n**3 / best / 1e12


def flops(cfg, n_trainable, seq):
    q_dim = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (q_dim // cfg.num_attention_heads)
    per_layer = h * q_dim * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    n = per_layer * cfg.num_hidden_layers + cfg.vocab_size * h
    attn = 12 * cfg.num_hidden_layers * q_dim * seq
    return n, 6 * n + attn, 4 * n + 6 * n_trainable + attn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--layers", type=int)
    p.add_argument("--train-type", default="qlora", choices=["qlora", "bnb_dora", "lora"])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpointing", default="true", choices=["true", "false"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--gemm-size", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kbit-prep", action="store_true",
                   help="call peft.prepare_model_for_kbit_training first (the QLoRA tutorials' recipe: "
                        "embedding, LM head and norms upcast to f32)")
    p.add_argument("--json")
    a = p.parse_args()
    if a.steps <= a.warmup:
        sys.exit(f"error: --steps ({a.steps}) must exceed --warmup ({a.warmup})")
    if not torch.cuda.is_available():
        sys.exit("error: the HF benchmark needs a CUDA GPU (bitsandbytes NF4 kernels)")
    import peft
    import transformers

    torch.manual_seed(a.seed)
    ckpt = a.checkpointing == "true"
    ceiling = gemm_ceiling(a.gemm_size) if a.gemm_size > 0 else None
    torch.cuda.empty_cache()

    t_load = time.perf_counter()
    cfg = build_config(a.model, a.layers)
    model = random_model(cfg)
    if a.train_type in ("qlora", "bnb_dora"):
        quantize_decoder_nf4(model)
    model.config.use_cache = False
    if a.kbit_prep:
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = peft.LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules=TARGETS,
                           bias="none", task_type="CAUSAL_LM", use_dora=a.train_type == "bnb_dora")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in params)
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=True)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t_load
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()

    g = torch.Generator(device="cuda").manual_seed(a.seed)
    step_ms, fb_ms, opt_ms, losses, dev_used = [], [], [], [], 0
    for _ in range(a.steps):
        micro = [torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq), device="cuda", generator=g)
                 for _ in range(a.grad_accum)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        total = 0.0
        for ids in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / a.grad_accum
            loss.backward()
            total += loss.detach()
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        fb_ms.append((t1 - t0) * 1e3)
        opt_ms.append((t2 - t1) * 1e3)
        step_ms.append((t2 - t0) * 1e3)
        losses.append(float(total))
        free, tot = torch.cuda.mem_get_info()
        dev_used = max(dev_used, tot - free)

    timed = slice(a.warmup, None)
    med = statistics.median(step_ms[timed])
    tokens_per_step = a.micro_batch * a.seq * a.grad_accum
    tps = tokens_per_step / (med / 1e3)
    n, fpt, fpt_frozen = flops(cfg, n_trainable, a.seq)
    out = {
        "impl": "hf+kbit-prep" if a.kbit_prep else "hf",
        "model": a.model, "layers": cfg.num_hidden_layers, "train_type": a.train_type, "seq": a.seq,
        "micro_batch": a.micro_batch, "grad_accum": a.grad_accum, "checkpointing": ckpt,
        "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "dtype": "bf16",
        "device": torch.cuda.get_device_name(), "steps": a.steps, "warmup": a.warmup,
        "tokens_per_step": tokens_per_step, "tokens_per_s": tps, "step_ms_median": med,
        "fwd_bwd_ms_median": statistics.median(fb_ms[timed]),
        "optimizer_ms_median": statistics.median(opt_ms[timed]), "step_ms": step_ms,
        "loss_first": losses[0], "loss_last": losses[-1],
        "params_matmul": n, "params_trainable": n_trainable, "flops_formula": FORMULA,
        "flops_per_token": fpt, "flops_per_token_frozen_base": fpt_frozen,
        "achieved_tflops": fpt * tps / 1e12, "gemm_size": a.gemm_size, "gemm_ceiling_tflops": ceiling,
        "mfu": fpt * tps / 1e12 / ceiling if ceiling else None,
        "mfu_frozen_base": fpt_frozen * tps / 1e12 / ceiling if ceiling else None,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB, "weights_gib": weights / GIB,
        "reserved_peak_gib": torch.cuda.max_memory_reserved() / GIB, "device_used_gib": dev_used / GIB,
        "load_s": load_s,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": bnb_version()},
    }
    text = json.dumps(out)
    print(text, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")


def bnb_version():
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
