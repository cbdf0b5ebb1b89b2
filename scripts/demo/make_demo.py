"""Writes llmft's built-in demo job (`llmft train` with no arguments) into
crates/cli/demo/: a character-level tokenizer, the tiny Llama config and a
small instruction dataset of checkable tasks (upper-casing a word, the
largest or smallest of a few digits), split into training and
held-out questions that never overlap.

    python3 scripts/demo/make_demo.py crates/cli/demo

Deterministic: the same files on every run (seeded generator, sorted keys).
"""
import json
import random
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "crates/cli/demo"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
rng = random.Random(20261201)


def tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        # One token per character (specials are matched before this split).
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }, len(vocab)


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def word(n):
    return "".join(rng.choice(LETTERS) for _ in range(n))


def task():
    kind = rng.choice(["upper", "max", "min"])
    if kind == "upper":
        w = word(rng.randint(3, 6))
        return f"upper {w}", w.upper()
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    pick = max(digits) if kind == "max" else min(digits)
    return f"{kind} {' '.join(map(str, digits))}", str(pick)


def main():
    tok, vocab_size = tokenizer()
    seen, held_out, train = set(), [], []
    while len(held_out) < 120:
        q, a = task()
        if q not in seen:
            seen.add(q)
            held_out.append({"question": q, "answer": a})
    while len(train) < 3000:
        q, a = task()
        if q not in seen:
            seen.add(q)
            train.append({"messages": [{"role": "user", "content": q},
                                       {"role": "assistant", "content": a}]})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 352,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "initializer_range": 0.02, "torch_dtype": "float32",
    }
    tok_config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "unk_token": "<unk>", "model_max_length": 256, "chat_template": TEMPLATE,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
    files = {"tokenizer.json": tok, "tokenizer_config.json": tok_config, "config.json": config}
    for name, obj in files.items():
        with open(f"{OUT}/{name}", "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
            f.write("\n")
    for name, rows in [("train.jsonl", train), ("heldout.jsonl", held_out)]:
        with open(f"{OUT}/{name}", "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")


main()
