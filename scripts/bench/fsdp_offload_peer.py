#!/usr/bin/env python3
"""The torch FSDP peer of `llmft bench` on the Llama-2-70B shape: the
mechanism of AnswerDotAI's fsdp_qlora (train.py) in one process on one GPU.

    python3 scripts/bench/fsdp_offload_peer.py [--layers 8] [--seq 2048] [--micro-batch 2] \
        [--cpu-offload true|false] [--steps 10] [--warmup 2] [--json FILE]

What runs, in the order fsdp_qlora does it:
  * the Llama-2-70B shape (hidden 8192, intermediate 28672, 64 heads, 8 kv heads,
    vocab 32000, rms eps 1e-5, rope theta 10000) cut to --layers decoder layers,
    random weights (normal, std 0.02; norms 1), bf16, sdpa attention; no download;
  * every decoder linear is a bitsandbytes NF4 Linear4bit with bf16 compute and
    bf16 quant_storage (so FSDP can flatten it with the bf16 norms), double-quant
    statistics (Linear4bit's default, as fsdp_qlora leaves it), block size 64;
    the model is built on the meta device and made real piece by piece: each
    linear's random bf16 weight exists only while it is quantized;
  * PEFT LoRA (r 16, alpha 32, dropout 0.0) on q,k,v,o,gate,up,down (fsdp_qlora's
    "all" leaves o_proj out; all 7 here, as llmft and hf_train_bench.py train);
  * torch.distributed with world size 1 (127.0.0.1, a free port), FSDP1
    FullyShardedDataParallel: each LlamaDecoderLayer is a unit and so is each
    trainable LoRA leaf linear (fsdp_qlora's policy: with use_orig_params=False
    a flat parameter needs one dtype and one requires_grad), FULL_SHARD,
    limit_all_gathers, sync_module_states off, CPUOffload(offload_params=True)
    with --cpu-offload true (parameters and gradients live in pinned host memory,
    copied to the GPU per unit; the optimizer steps on the host). At world size
    1 torch would turn FULL_SHARD into NO_SHARD, whose offloaded units all stay
    resident on the GPU once they have run; --keep-full-shard true skips that
    one clamp so the per-unit copy-in/free of >= 2 GPUs is what is measured,
    false leaves torch's behaviour (what fsdp_qlora's train.py gets on one
    GPU); the default, auto, keeps FULL_SHARD with --cpu-offload true and
    takes torch's NO_SHARD without (there FULL_SHARD at world size 1 only adds
    a copy of each unit: slower, higher peak); fsdp.sharding_effective in the
    JSON says which ran;
  * non-reentrant activation checkpointing of each decoder layer
    (apply_activation_checkpointing, CheckpointImpl.NO_REENTRANT);
  * random token ids, causal-LM loss, torch AdamW on the LoRA parameters
    (lr 1e-4, betas 0.9/0.95, eps 1e-5, weight decay 0.1 as fsdp_qlora's adamw).
--precision bf16 (default, fsdp_qlora's and its 70B CPU-offload recipe's):
pure bf16, no FSDP MixedPrecision, no autocast; the adapters are bf16 like the
base (what fsdp_qlora's PEFT gave; current PEFT upcasts them to f32 unless told
not to; --adapter-dtype fp32 keeps f32). --precision bf16_buffers_autocast:
MixedPrecision(param bf16, reduce bf16, buffer f32) and bf16 autocast.

Timing: --warmup untimed steps, then --steps timed steps; tokens/s =
seq * micro_batch * steps / (time of the timed steps, torch.cuda.synchronize
around them). Peak = torch.cuda.max_memory_allocated over the timed steps (the
statistics are reset when they start; the weights resident on the GPU count),
with max_memory_reserved beside it; host_rss_gib is the process's peak RSS
(getrusage), host_rss_now_gib the RSS at the end. Prints one JSON object.

Checking without a GPU: --device cpu --train-type lora (plain bf16 nn.Linear
base, no bitsandbytes, gloo) with a small --hidden-override/--vocab-override
runs the same building, PEFT, FSDP wrapping, checkpointing and training step.
"""
import argparse
import functools
import gc
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch

GIB = float(1 << 30)
# config.json fields of meta-llama/Llama-2-70b-hf.
LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INIT_STD = 0.02
FORMULA = ("flops_per_token = 6*N + 12*L*q_dim*seq (N = decoder linear + LM head weights); "
           "flops_per_token_frozen_base = 4*(N - N_trainable) + 6*N_trainable + 12*L*q_dim*seq; "
           "recompute under checkpointing not counted")


def boolean(s):
    if s.lower() in ("true", "1", "yes", "on"):
        return True
    if s.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got `{s}`")


def build_config(a):
    from transformers import LlamaConfig

    d = dict(LLAMA2_70B)
    if a.hidden_override:
        h = a.hidden_override
        heads = max(1, h // 128)
        d.update(hidden_size=h, intermediate_size=max(64, (h * 28672 // 8192) // 64 * 64),
                 num_attention_heads=heads, num_key_value_heads=max(1, heads // 8))
        if h % heads:
            sys.exit(f"error: --hidden-override {h} is not a multiple of its head count {heads}")
    if a.vocab_override:
        d["vocab_size"] = a.vocab_override
    d.update(num_hidden_layers=a.layers, initializer_range=INIT_STD, tie_word_embeddings=False, use_cache=False,
             attention_dropout=0.0, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    return LlamaConfig(**d)


def require_bitsandbytes(dev):
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        sys.exit(f"error: --train-type qlora needs bitsandbytes (NF4 Linear4bit) and it does not import: {e}. "
                 "Put bitsandbytes (0.50.2 was used) on PYTHONPATH (scripts/gpu/peer_offload.sh uses "
                 ".gpu/e2e/site) or run --train-type lora for a bf16 base.")
    if not hasattr(bnb.nn, "Linear4bit") or "quant_storage" not in bnb.nn.Linear4bit.__init__.__code__.co_varnames:
        sys.exit(f"error: bitsandbytes {getattr(bnb, '__version__', '?')} has no Linear4bit(quant_storage=...): "
                 "FSDP-QLoRA needs bitsandbytes >= 0.43")
    try:  # the native CUDA library loads lazily: fail here rather than in the middle of the build
        probe = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
        bnb.functional.quantize_4bit(probe, quant_type="nf4", quant_storage=torch.bfloat16)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - any failure here means no usable NF4 kernels
        sys.exit(f"error: bitsandbytes {bnb.__version__} imported but could not quantize to NF4 on {dev}: "
                 f"{type(e).__name__}: {e}. Is its CUDA library for this torch's CUDA "
                 f"({torch.version.cuda}) in the package, and LD_LIBRARY_PATH set?")
    return bnb


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group(backend, rank=0, world_size=1)
    return dist


def random_bf16(shape, dev, g):
    return torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, INIT_STD, generator=g)


def base_linear(in_f, out_f, dev, g, bnb):
    """A frozen linear of the base with a random bf16 weight: NF4 Linear4bit
    quantized on `dev` (bf16 quant_storage, as fsdp_qlora builds it), or a
    plain bf16 nn.Linear when bnb is None."""
    w = random_bf16((out_f, in_f), dev, g)
    if bnb is None:
        lin = torch.nn.Linear(in_f, out_f, bias=False, device="meta")
        lin.weight = torch.nn.Parameter(w, requires_grad=False)
        return lin
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                          quant_type="nf4", quant_storage=torch.bfloat16, device="meta")
    # Params4bit.to(device) quantizes (and records the quant_state on the module, whence
    # bitsandbytes recovers it after FSDP has turned the weight into a flat-parameter view).
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.bfloat16, module=q).to(dev)
    del w
    return q


def materialize(module, dev, g, bnb):
    """Gives every meta parameter of `module` real storage on `dev`: linears
    become base_linear, embeddings get normal(0, 0.02) weights, everything else
    (the RMSNorm scales) ones."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.weight.is_meta:
                if child.bias is not None:
                    sys.exit("error: Llama linears have no bias; the shape built here has one")
                setattr(parent, name, base_linear(child.in_features, child.out_features, dev, g, bnb))
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            if isinstance(sub, torch.nn.Embedding):
                data = random_bf16(tuple(p.shape), dev, g)
            else:
                data = torch.ones(p.shape, dtype=torch.bfloat16, device=dev)
            setattr(sub, name, torch.nn.Parameter(data, requires_grad=False))


def build_model(cfg, dev, bnb, g):
    """The model skeleton on the meta device, then made real one piece at a
    time: the embedding, each decoder layer (its bf16 weights quantized and
    freed before the next), the final norm, the LM head, the rotary table."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    inner = model.model
    materialize(inner.embed_tokens, dev, g, None)
    for layer in inner.layers:
        materialize(layer, dev, g, bnb)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    materialize(inner.norm, dev, g, None)
    lm_head = torch.nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(random_bf16((cfg.vocab_size, cfg.hidden_size), dev, g), requires_grad=False)
    model.lm_head = lm_head
    # inv_freq is computed at construction, so a meta one cannot be filled in: build it anew on the device.
    with torch.device(dev):
        inner.rotary_emb = type(inner.rotary_emb)(config=model.config)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        sys.exit(f"error: tensors left on the meta device after the build: {left[:8]}")
    model.config.use_cache = False
    if bnb is not None:
        try:
            model.is_loaded_in_4bit = True  # PEFT then wraps the layers with its bnb LoRA layer
        except AttributeError:
            pass
    return model


def wrap_policy(decoder_cls):
    """fsdp_qlora's policy for LoRA: a unit per decoder layer and one per
    trainable leaf module (the LoRA A and B linears), the rest in the root."""

    def policy(module, recurse, nonwrapped_numel):
        if recurse:
            return True
        if isinstance(module, decoder_cls):
            return True
        w = getattr(module, "weight", None)
        return next(module.children(), None) is None and isinstance(w, torch.Tensor) and w.requires_grad

    return policy


def keep_full_shard_at_world1():
    """torch's FSDP1 turns any sharded strategy into NO_SHARD when the world
    size is 1 (`_init_core_state`: "functionally equivalent"). For parameter
    offload it is not equivalent in memory: NO_SHARD's GPU copy of a unit
    stays referenced by the module's views after the unit has run, so every
    unit's weights end up resident on the GPU. This skips only that clamp (the
    world size reads 2 during that one call), so FULL_SHARD runs its real code
    path at world size 1: each unit is copied in ("all-gathered" from the one
    shard) before it runs and freed after, as on two or more GPUs."""
    import torch.distributed.fsdp.fully_sharded_data_parallel as fsdp_mod

    orig = fsdp_mod._init_core_state
    if getattr(orig, "_peer_keeps_full_shard", False):
        return

    @functools.wraps(orig)
    def init_core_state(state, *args, **kwargs):
        world = state.world_size
        state.world_size = max(world, 2)
        try:
            return orig(state, *args, **kwargs)
        finally:
            state.world_size = world

    init_core_state._peer_keeps_full_shard = True
    fsdp_mod._init_core_state = init_core_state


def flops(cfg, n_trainable, seq):
    q_dim = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (q_dim // cfg.num_attention_heads)
    per_layer = h * q_dim * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    n = per_layer * cfg.num_hidden_layers + cfg.vocab_size * h
    attn = 12 * cfg.num_hidden_layers * q_dim * seq
    return n, 6 * n + attn, 4 * n + 6 * n_trainable + attn


def rss_now():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def version(mod):
    try:
        return __import__(mod).__version__
    except ImportError:
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-70b", choices=["llama2-70b"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--train-type", default="qlora", choices=["qlora", "lora"],
                   help="qlora: NF4 base (bitsandbytes); lora: bf16 nn.Linear base (no bitsandbytes)")
    p.add_argument("--no-quant", action="store_true", help="the same as --train-type lora")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after the warmup steps)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--cpu-offload", type=boolean, default=False, help="FSDP CPUOffload(offload_params=True)")
    p.add_argument("--checkpointing", type=boolean, default=True,
                   help="non-reentrant activation checkpointing of each decoder layer")
    p.add_argument("--keep-full-shard", default="auto", choices=["auto", "true", "false"],
                   help="true: FULL_SHARD really runs at world size 1 (torch's NO_SHARD clamp skipped, so an "
                        "offloaded unit's GPU copy is freed after use as on >= 2 GPUs); false: torch's clamp; "
                        "auto (default): true with --cpu-offload true, false without")
    p.add_argument("--precision", default="bf16", choices=["bf16", "bf16_buffers_autocast"])
    p.add_argument("--adapter-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip-grad", type=float, default=0.0,
                   help="FSDP clip_grad_norm_ to this norm; 0 = off (fsdp_qlora's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a check of the building/wrapping/step code (gloo, --train-type lora)")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl on cuda, gloo on cpu")
    p.add_argument("--hidden-override", type=int, help="a smaller hidden size (heads = hidden/128) for checks")
    p.add_argument("--vocab-override", type=int)
    p.add_argument("--json", help="also write the JSON line to this file")
    a = p.parse_args()
    if a.no_quant:
        a.train_type = "lora"
    a.keep_full_shard = a.cpu_offload if a.keep_full_shard == "auto" else a.keep_full_shard == "true"
    if a.steps < 1 or a.warmup < 0 or a.layers < 1:
        sys.exit("error: need --steps >= 1, --warmup >= 0, --layers >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU visible to torch (use --device cpu --train-type lora for a CPU check)")
    if a.device == "cpu" and a.train_type == "qlora":
        sys.exit("error: --device cpu checks the bf16 path only: add --train-type lora (or --no-quant)")
    if a.device == "cpu" and a.cpu_offload:
        sys.exit("error: --cpu-offload needs a CUDA compute device (pinned host memory)")

    import peft
    import transformers
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )
    from torch.distributed.fsdp import CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    cuda = a.device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    bnb = require_bitsandbytes(dev) if a.train_type == "qlora" else None
    dist = init_distributed(a.backend or ("nccl" if cuda else "gloo"))
    if a.cpu_offload:  # as fsdp_qlora: the host runs the optimizer step on all cores
        torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(a.seed)
    g = torch.Generator(device=dev).manual_seed(a.seed)

    t_load = time.perf_counter()
    cfg = build_config(a)
    model = build_model(cfg, dev, bnb, g)
    lcfg = peft.LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, target_modules=TARGETS,
                           bias="none", task_type="CAUSAL_LM", inference_mode=False)
    model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=a.adapter_dtype == "fp32")
    lora_params = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for _, q in lora_params)
    if not lora_params or any("lora_" not in n for n, _ in lora_params):
        sys.exit(f"error: expected only LoRA parameters to train, got {[n for n, _ in lora_params][:4]}")
    adapter_dtype = str(lora_params[0][1].dtype).replace("torch.", "")
    lora_cls = type(model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj"))
    lora_cls = f"{lora_cls.__module__}.{lora_cls.__qualname__}"
    if cuda:
        torch.cuda.synchronize()
    if a.precision == "bf16_buffers_autocast":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.float32)
    else:
        mp = None
    if a.keep_full_shard:
        keep_full_shard_at_world1()
    model = FSDP(
        model,
        sharding_strategy=ShardingStrategy.FULL_SHARD,
        auto_wrap_policy=wrap_policy(LlamaDecoderLayer),
        use_orig_params=False,
        cpu_offload=CPUOffload(offload_params=True) if a.cpu_offload else None,
        limit_all_gathers=True,
        device_id=dev,
        sync_module_states=False,
        mixed_precision=mp,
    )
    n_units = sum(1 for m in model.modules() if isinstance(m, FSDP))
    if a.checkpointing:
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
        )
    n_ckpt = sum(1 for m in model.modules() if type(m).__name__ == "CheckpointWrapper")
    params = [q for q in model.parameters() if q.requires_grad]
    flat_devices = sorted({str(q.device) for q in model.parameters()})
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=a.weight_decay)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t_load
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        resident_after_wrap = torch.cuda.memory_allocated()
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if a.precision == "bf16_buffers_autocast"
                else None)

    batches = [torch.randint(0, cfg.vocab_size, (a.micro_batch, a.seq), device=dev, generator=g)
               for _ in range(a.warmup + a.steps)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model.train()
    step_ms, losses, dev_used, t_timed = [], [], 0, None
    for i, ids in enumerate(batches):
        if i == a.warmup:
            sync()
            gc.collect()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                weights = torch.cuda.memory_allocated()
            t_timed = time.perf_counter()
        t0 = time.perf_counter()
        if autocast is not None:
            with autocast:
                loss = model(input_ids=ids, labels=ids, attention_mask=None).loss
        else:
            loss = model(input_ids=ids, labels=ids, attention_mask=None).loss
        loss.backward()
        if a.clip_grad > 0:
            model.clip_grad_norm_(a.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync, as fsdp_qlora's loss logging
        del loss
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)
        if cuda and i >= a.warmup:
            free, tot = torch.cuda.mem_get_info()
            dev_used = max(dev_used, tot - free)
    sync()
    timed_s = time.perf_counter() - t_timed

    tokens_per_step = a.seq * a.micro_batch
    tps = tokens_per_step * a.steps / timed_s
    timed = step_ms[a.warmup:]
    n, fpt, fpt_frozen = flops(cfg, n_trainable, a.seq)
    shape_override = {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                   "num_key_value_heads", "vocab_size")
                      if getattr(cfg, k) != LLAMA2_70B[k]}
    vers = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": version("bitsandbytes")}
    out = {
        "impl": "torch_fsdp_qlora",
        "variant": f"{'cpu_offload' if a.cpu_offload else 'no_offload'}, {model.sharding_strategy.name}",
        "model": a.model, "layers": cfg.num_hidden_layers, "train_type": a.train_type,
        "seq": a.seq, "micro_batch": a.micro_batch, "grad_accum": 1, "checkpointing": a.checkpointing,
        "world_size": dist.get_world_size(),
        "offload": {"params": a.cpu_offload, "grads": a.cpu_offload, "optimizer_on_host": a.cpu_offload,
                    "activations": False},
        "simulated": False,
        "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
        "host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "tokens_per_s": tps,
        "step_ms": timed_s * 1e3 / a.steps,
        **vers,
        "step_ms_median": statistics.median(timed), "step_ms_list": step_ms,
        "steps": a.steps, "warmup": a.warmup, "tokens_per_step": tokens_per_step,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "weights_gib": weights / GIB if cuda else None,
        "resident_after_wrap_gib": resident_after_wrap / GIB if cuda else None,
        "device_used_gib": dev_used / GIB if cuda else None,
        "host_rss_now_gib": (rss_now() or 0) / GIB,
        "load_s": load_s, "loss_first": losses[0], "loss_last": losses[-1],
        "shape_override": shape_override or None,
        "precision": a.precision, "adapter_dtype": adapter_dtype, "autocast": autocast is not None,
        "quant": ({"type": "nf4", "storage": "bf16", "compute": "bf16", "double_quant": True, "blocksize": 64}
                  if bnb else None),
        "lora_r": a.lora_r, "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout, "lora_targets": TARGETS,
        "lora_layer": lora_cls, "params_trainable": n_trainable,
        "fsdp": {"api": "FSDP1 FullyShardedDataParallel", "sharding_requested": "FULL_SHARD",
                 "sharding_effective": model.sharding_strategy.name,
                 "world1_no_shard_clamp_skipped": a.keep_full_shard, "use_orig_params": False,
                 "limit_all_gathers": True, "sync_module_states": False,
                 "mixed_precision": ("param bf16, reduce bf16, buffer fp32" if mp else None),
                 "units": n_units, "wrap": "LlamaDecoderLayer + trainable leaf modules (LoRA A/B)",
                 "flat_param_devices": flat_devices, "backend": dist.get_backend()},
        "activation_checkpointing": ({"impl": "apply_activation_checkpointing, CheckpointImpl.NO_REENTRANT",
                                      "wrapped_layers": n_ckpt} if a.checkpointing else None),
        "attn_implementation": "sdpa",
        "optimizer": {"name": "torch.optim.AdamW", "lr": a.lr, "betas": [0.9, 0.95], "eps": 1e-5,
                      "weight_decay": a.weight_decay, "fused": False, "clip_grad": a.clip_grad or None},
        "cpu_threads": torch.get_num_threads(),
        "params_matmul": n, "flops_formula": FORMULA, "flops_per_token": fpt,
        "flops_per_token_frozen_base": fpt_frozen, "achieved_tflops": fpt * tps / 1e12,
        "versions": vers,
    }
    text = json.dumps(out)
    print(text, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
