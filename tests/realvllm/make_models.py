"""The tiny models the tests serve with the real vLLM, made here (no hub, no network).

    .realvllm/venv/bin/python tests/realvllm/make_models.py OUT_DIR

writes
  OUT_DIR/tiny-std      a Qwen2-architecture model whose weights are wired so its output is a
                        known token chain: reasoning whose length depends on `reasoning_effort`,
                        `</think>`, then a known answer and EOS, or (when tools are sent) a
                        step3p5 XML tool call and EOS. Deterministic at any temperature (huge
                        logit margins).
  OUT_DIR/tiny-step3p7  a config of the real `Step3p7ForConditionalGeneration` architecture
                        (vision encoder + step3p5 MoE text model), served with --load-format dummy.
  OUT_DIR/models.json   what the tests expect of them (texts, token counts, tool call, ids).

Both share one byte-level BPE tokenizer trained here and the chat template
tests/realvllm/chat_template.jinja. Idempotent: nothing is redone while OUT_DIR holds a stamp made
from this file's and its data files' contents.

How tiny-std answers (the recipe of reference/machines.md, spelled out): the residual stream of
a position is its token's embedding plus one attention layer's output, because every other
output projection (the MLPs' down_proj, the second layer's o_proj) is zero. Chain tokens have
one-hot embeddings and lm_head rows that point at their successors, so each next token is a
function of the current one. The one place that must look back is the first generated token:
the prompt always ends in `<think>\\n`, so three attention heads with a constant query find the
marker tokens the template wrote earlier (`Reasoning: low|medium|high`, `<tools>`,
`<tool_response>`) and copy them into the residual stream, where lm_head turns them into the
chain entry (a later entry for a lower level: 8/24/64 reasoning tokens) and, at `</think>`,
into the tool call instead of the answer. The query and key live in each head's last dimension,
the one RoPE turns slowest (both the neox and the GPT-J pairing), so position does not matter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "chat_template.jinja"
STEP_CONFIG_CODE = HERE / "configuration_step3p7.py"
SCHEMA = 1  # bump when models.json changes shape

SERVED_STD = "tiny-std"
SERVED_STEP = "tiny-step3p7"

# ------------------------------------------------------------------------------ the token chain

NUMBER_WORDS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
TENS = ("twenty", "thirty", "forty", "fifty", "sixty")


def number_word(n: int) -> str:
    if n <= 20:
        return NUMBER_WORDS[n - 1]
    tens, unit = divmod(n, 10)
    return TENS[tens - 2] + ("" if unit == 0 else "-" + NUMBER_WORDS[unit - 1])


REASONING_STEPS = 64
# Reasoning pieces: "one ", "two ", ..., "sixty-four." (each a single, distinct token).
REASONING = [number_word(i) + " " for i in range(1, REASONING_STEPS)] + [
    number_word(REASONING_STEPS) + "."
]
LEVELS = {"low": 8, "medium": 24, "high": 64}  # reasoning tokens per level
ANSWER = ["The", " answer", " is", " 42", "."]
TOOL_NAME = "get_weather"
TOOL_ARGS = {"city": "Paris"}
TOOL_PIECES = [
    "\n<function=get_weather>\n",
    "<parameter=city>\n",
    "Paris",
    "\n</parameter>\n",
    "</function>\n",
]

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The image tokens vLLM's Step3-VL processor looks up by name
# (vllm/transformers_utils/processors/step3_vl.py, Step3VLProcessor.__init__).
IMAGE_TOKENS = [
    "<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>"
]  # fmt: skip
# Not special (kept in decoded text, as Qwen3's are): the parsers read them.
THINK_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
MARKERS = {
    "low": "Reasoning: low",
    "medium": "Reasoning: medium",
    "high": "Reasoning: high",
    "tools": "<tools>",
    "tool_response": "<tool_response>",
}
EXTRA_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or had by not word but what some we can out other were all there when up use your how said "
    "an each she which do their time if will way about many then them write would like so these "
    "her long make thing see him two has look more day could go come did number sound no most "
    "people my over know water than call first who may down side been now find any new work part "
    "take get place made live where after back little only round man year came show every good "
    "me give our under name very through just form sentence great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three want air well "
    "also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country "
    "found answer school grow study still learn plant cover food sun four between state keep eye "
    "never last let thought city tree cross farm hard start might story saw far sea draw left "
    "late run while press close night real life few north open seem together next white children "
    "begin got walk example ease paper group always music those both mark often letter until mile "
    "river car feet care second book carry took science eat room friend began idea fish mountain "
    "stop once base hear horse cut sure watch color face wood main enough plain girl usual young "
    "ready above ever red list though feel talk bird soon body dog family direct pose leave song "
    "measure door product black short numeral class wind question happen complete ship area half "
    "rock order fire south problem piece told knew pass since top whole king space heard best hour "
    "better true during hundred five remember step early hold west ground interest reach fast "
    "verb sing listen six table travel less morning ten simple several vowel toward war lay "
    "against pattern slow center love person money serve appear road map rain rule govern pull "
    "cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan "
    "figure star box noun field rest correct able pound done beauty drive stood contain front "
    "teach week final gave green oh quick develop ocean warm free minute strong special mind "
    "behind clear tail produce fact street inch multiply nothing course stay wheel full force "
    "blue object decide surface deep moon island foot system busy test record boat common gold "
    "possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss "
    "brought heat snow tire bring yes distant fill east paint language among weather image hello "
    "model assistant user system tool function parameter reasoning content message Paris London "
    "Berlin Tokyo"
).split()


def corpus() -> list[str]:
    """Local training text: each item is one BPE word (the pre-tokenizer does not split)."""
    items: list[str] = []
    for word in EXTRA_WORDS:
        items += [word] * 3 + [" " + word] * 5 + [word.capitalize(), " " + word.capitalize()]
    for piece in REASONING + ANSWER + TOOL_PIECES:
        items += [piece] * 40  # frequent enough that each becomes one token
    for text in (",", ".", ":", ";", "!", "?", "\n", "\n\n", " ", "  ", "{", "}", '"', "'",
                 '": "', '", "', "[", "]", "(", ")", "-", "_", "/", "=", "<", ">", "0", "1",
                 "2", "3", "4", "5", "6", "7", "8", "9", "10", "100", "2026"):  # fmt: skip
        items += [text] * 20
    return items


# ------------------------------------------------------------------------------- the tokenizer


def build_tokenizer() -> object:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No regex split: BPE may merge across spaces and punctuation, so every chain piece (even
    # "\n<function=get_weather>\n") is one token and no token repeats within a chain.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=SPECIAL + IMAGE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS.values()])
    return tok


def single_id(tok: object, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False).ids  # type: ignore[attr-defined]
    if len(ids) != 1:
        raise SystemExit(f"make_models: {text!r} is {len(ids)} tokens, not 1; raise its count")
    return int(ids[0])


def save_tokenizer(tok: object, out: Path, image_placeholder: str) -> str:
    from transformers import PreTrainedTokenizerFast

    template = TEMPLATE.read_text()
    line = '{%- set image_placeholder = "[image]" -%}'
    if line not in template:
        raise SystemExit(f"make_models: {TEMPLATE} lost its image_placeholder line")
    template = template.replace(line, line.replace("[image]", image_placeholder))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=template,
    )
    # Loaded back, transformers 5 makes tiny-std's a Qwen2Tokenizer (by model_type, whatever
    # tokenizer_config says: it puts Qwen2's regex split before this BPE) and tiny-step3p7's the
    # generic backend (vllm/tokenizers/registry.py forces that for step3p7). So the two split
    # prompts differently; the added tokens, the markers and the decoding of the chain are the same.
    fast.save_pretrained(out)
    return template


# ------------------------------------------------------------------------------- tiny-std


def make_std(tok: object, out: Path) -> dict[str, object]:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    vocab = tok.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
    vocab_size = (vocab + 63) // 64 * 64
    eos = tok.token_to_id("<|im_end|>")  # type: ignore[attr-defined]
    endoftext = tok.token_to_id("<|endoftext|>")  # type: ignore[attr-defined]

    reasoning_ids = [single_id(tok, p) for p in REASONING]
    answer_ids = [single_id(tok, p) for p in ANSWER]
    tool_ids = [single_id(tok, p) for p in TOOL_PIECES]
    think_end = tok.token_to_id("</think>")  # type: ignore[attr-defined]
    call_start = tok.token_to_id("<tool_call>")  # type: ignore[attr-defined]
    call_end = tok.token_to_id("</tool_call>")  # type: ignore[attr-defined]
    marker_ids = {k: tok.token_to_id(v) for k, v in MARKERS.items()}  # type: ignore[attr-defined]

    # successor of each chain token
    answer_chain = [*reasoning_ids, think_end, *answer_ids, eos]
    tool_chain = [call_start, *tool_ids, call_end, eos]
    succ: dict[int, int] = {}
    for chain in (answer_chain, tool_chain):
        for cur, nxt in zip(chain, chain[1:], strict=False):
            if cur in succ and succ[cur] != nxt:
                raise SystemExit(f"make_models: token {cur} has two successors")
            succ[cur] = nxt
    chain_tokens = sorted(set(succ))
    if len(set(answer_chain)) != len(answer_chain) or len(set(tool_chain)) != len(tool_chain):
        raise SystemExit("make_models: a chain repeats a token")

    hidden, heads = 128, 4
    head_dim = hidden // heads
    dims: dict[int, int] = {}
    for t in chain_tokens + list(marker_ids.values()):
        dims[t] = len(dims)
    if len(dims) > hidden:
        raise SystemExit("make_models: more chain tokens than hidden dimensions")

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
        bos_token_id=endoftext,
        eos_token_id=eos,
        pad_token_id=endoftext,
        architectures=["Qwen2ForCausalLM"],
    )
    config.dtype = "bfloat16"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    norm_one = hidden**0.5  # what RMSNorm makes of a one-hot input
    for key in sd:
        if key.endswith("layernorm.weight") or key == "model.norm.weight":
            sd[key].fill_(1.0)
    sd["model.embed_tokens.weight"][:, :] = 0.0
    for t, d in dims.items():
        sd["model.embed_tokens.weight"][t, d] = 1.0

    # Layer 0 attention: head 0 finds the level marker, head 1 `<tools>`, head 2 `<tool_response>`.
    # Query = a constant bias, key = the marker's one-hot, both in the head's last dimension:
    # score Q*K/sqrt(head_dim) = 45 on a marker, 0 elsewhere, so attention sits on the marker.
    q_k = 16.0
    attn = "model.layers.0.self_attn."
    heads_of = {0: ["low", "medium", "high"], 1: ["tools"], 2: ["tool_response"]}
    for h, names in heads_of.items():
        last = h * head_dim + head_dim - 1
        sd[attn + "q_proj.bias"][last] = q_k
        for i, name in enumerate(names):
            d = dims[marker_ids[name]]
            sd[attn + "k_proj.weight"][last, d] = q_k / norm_one
            sd[attn + "v_proj.weight"][h * head_dim + i, d] = 1.0
            sd[attn + "o_proj.weight"][d, h * head_dim + i] = 1.0 / norm_one

    # lm_head: logit(s) = W[s] . RMSNorm(residual). At most 4 unit components are ever active
    # (a chain token, the level, <tools>, <tool_response>), so a unit of W is >= 5.6 logits; the
    # smallest margin below is 10 units (56 logits), so temperature 1.0 still picks the same token.
    w = sd["lm_head.weight"]
    chain_w, level_w, tools_w, think_to_call, response_to_answer = 60.0, 30.0, 20.0, 50.0, 20.0
    for cur, nxt in succ.items():
        w[nxt, dims[cur]] = chain_w
    entries = {}
    for level, count in LEVELS.items():
        entry = reasoning_ids[REASONING_STEPS - count]
        entries[level] = entry
        w[entry, dims[marker_ids[level]]] = level_w
    w[call_start, dims[think_end]] = think_to_call
    w[call_start, dims[marker_ids["tools"]]] = tools_w
    w[answer_ids[0], dims[marker_ids["tool_response"]]] = response_to_answer

    model.load_state_dict(sd)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(
        bos_token_id=endoftext,
        eos_token_id=[eos, endoftext],
        pad_token_id=endoftext,
        do_sample=True,
        temperature=1.0,
        top_p=0.95,
    ).save_pretrained(out)

    return {
        "dir": SERVED_STD,
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "answer": "".join(ANSWER),
        "answer_tokens": len(ANSWER),
        "reasoning": {
            level: {"tokens": count, "text": "".join(REASONING[REASONING_STEPS - count :])}
            for level, count in LEVELS.items()
        },
        "default_level": "medium",
        "level_aliases": {"none": "low", "minimal": "low", "xhigh": "high", "max": "high"},
        "tool_call": {
            "name": TOOL_NAME,
            "arguments": TOOL_ARGS,
            "text": "<tool_call>" + "".join(TOOL_PIECES) + "</tool_call>",
            "tokens": len(tool_chain) - 1,
            "note": "the call is fixed: send a tool named get_weather (with a city parameter)",
        },
        "after_tool_response": "answer",
        "token_ids": {
            "think_end": think_end,
            "tool_call": call_start,
            "reasoning_entry": entries,
            "answer": answer_ids,
        },
    }


# ------------------------------------------------------------------------------- tiny-step3p7


def make_step(tok: object, out: Path) -> dict[str, object]:
    vocab = tok.get_vocab_size(with_added_tokens=True)  # type: ignore[attr-defined]
    vocab_size = (vocab + 63) // 64 * 64
    eos = tok.token_to_id("<|im_end|>")  # type: ignore[attr-defined]
    endoftext = tok.token_to_id("<|endoftext|>")  # type: ignore[attr-defined]
    image_token = tok.token_to_id("<im_patch>")  # type: ignore[attr-defined]
    layers = 2
    text_config = {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "vocab_size": vocab_size,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_attention_groups": 2,
        "head_dim": 64,
        "max_seq_len": 4096,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": [1000000.0, 10000.0],
        "layer_types": ["full_attention", "sliding_attention"],
        "sliding_window": 128,
        "attention_other_setting": {
            "attention_type": "sliding_attention",
            "num_attention_heads": 4,
            "num_attention_groups": 2,
            "head_dim": 64,
        },
        "use_head_wise_attn_gate": True,
        "moe_layers_enum": "1",
        "moe_num_experts": 4,
        "moe_top_k": 2,
        "moe_intermediate_size": 128,
        "share_expert_dim": 128,
        "moe_router_activation": "softmax",  # the CPU MoE router takes softmax, not sigmoid
        "moe_router_scaling_factor": 1.0,
        "norm_expert_weight": True,
        "use_moe_router_bias": True,
        "need_fp32_gate": True,
        "att_impl_type": "GQA",
        "num_nextn_predict_layers": 0,
        "swiglu_limits": [0.0] * layers,
        "swiglu_limits_shared": [0.0] * layers,
        "tie_word_embeddings": False,
        "bos_token_id": endoftext,
        "eos_token_id": eos,
    }
    vision_config = {
        "width": 64,
        "layers": 1,
        "heads": 2,
        "image_size": 728,
        "patch_size": 14,
        "mlp_ratio": 4.0,
        "ls_init_value": 0.1,
        "output_dim": None,
        "hidden_act": "gelu",
        "use_abs_posemb": True,
        "use_cls_token": False,
        "use_rope2d": True,
        "use_ln_pre": True,
        "use_ln_post": False,
        "enable_patch": True,
    }
    config = {
        "architectures": ["Step3p7ForConditionalGeneration"],
        "model_type": "step3p7",
        "auto_map": {"AutoConfig": "configuration_step3p7.Step3p7Config"},
        "image_token_id": image_token,
        "projector_bias": False,
        "hidden_size": text_config["hidden_size"],
        "bos_token_id": endoftext,
        "eos_token_id": eos,
        "torch_dtype": "bfloat16",
        "text_config": text_config,
        "vision_config": vision_config,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(STEP_CONFIG_CODE, out / STEP_CONFIG_CODE.name)
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": endoftext, "eos_token_id": [eos, endoftext]}, indent=2) + "\n"
    )
    return {
        "dir": SERVED_STEP,
        "architectures": ["Step3p7ForConditionalGeneration"],
        "text_architectures": ["Step3p5ForCausalLM"],
        "load_format": "dummy",
        "vocab_size": vocab_size,
        "eos_token_id": eos,
        "image_token": "<im_patch>",
        "image_token_id": image_token,
        "text_layers": layers,
        "layer_types": text_config["layer_types"],
        "experts": text_config["moe_num_experts"],
        "experts_per_token": text_config["moe_top_k"],
        "vision": {"width": 64, "layers": 1, "image_size": 728, "patch_size": 14},
    }


# ------------------------------------------------------------------------------- main


def stamp_of() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__).resolve(), TEMPLATE, STEP_CONFIG_CODE):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: make_models.py OUT_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    root = Path(argv[1]).resolve()
    stamp = root / f".made-{stamp_of()}"
    if stamp.exists() and (root / "models.json").exists():
        return 0
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".making"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tok = build_tokenizer()
    std_dir, step_dir = tmp / SERVED_STD, tmp / SERVED_STEP
    std_dir.mkdir()
    step_dir.mkdir()
    save_tokenizer(tok, std_dir, "[image]")
    save_tokenizer(tok, step_dir, "<im_patch>")
    manifest = {
        "schema": SCHEMA,
        "stamp": stamp.name,
        "chat_template": {
            "reasoning_line": "Reasoning: <level>",
            "prefill": "<think>\n",
            "levels": list(LEVELS),
        },
        "std": make_std(tok, std_dir),
        "step": make_step(tok, step_dir),
    }
    (tmp / "models.json").write_text(json.dumps(manifest, indent=2) + "\n")
    # Swap in: the old models go only once the new ones are complete, each folder by two renames
    # (an engine starting meanwhile from another checkout's run sees one or the other, whole).
    for old in root.glob(".made-*"):
        old.unlink()
    retired = tmp / "retired"
    retired.mkdir()
    for name in (SERVED_STD, SERVED_STEP, "models.json"):
        target = root / name
        if target.exists():
            target.rename(retired / name)
        (tmp / name).rename(target)
    shutil.rmtree(tmp)
    stamp.write_text(stamp.name + "\n")
    print(f"make_models: wrote {root / SERVED_STD}, {root / SERVED_STEP}, {root / 'models.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
