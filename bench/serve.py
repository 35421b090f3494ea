"""`kaizen bench serve`: the server's throughput and latency under concurrent load.

1. Start `kaizen serve`, warm it up, and stream N chat requests from C client threads,
   each asking for exactly T tokens: tokens/s, time to first token, inter-token latency
   and request latency.
2. Still on that server: C-1 streams of T tokens, and once they all decode, one prompt of
   `--long-prompt-tokens` tokens: the streams' inter-token p99 while it is served, against
   step 1's, and its own time to first token.
3. Stop it, then generate the same N answers in this process with plain batched
   `model.generate` (batch C, left-padded) and, for K of them, one request at a time:
   the two baselines the server's batching is compared with.
"""

from __future__ import annotations

import math
import shlex
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from bench.config import ServeBench
from bench.load import (
    PROMPTS,
    TEMPERATURE,
    TOP_P,
    LongPromptResult,
    kaizen_server,
    percentile,
    run_load,
    run_long_prompt,
    say,
    warm_up,
)
from bench.report import environment
from bench.swap import LORA, publish, wait_serving_version
from kaizen import modeling
from kaizen.registry import BASE_VERSION, Registry


def run(config: ServeBench) -> dict[str, object]:
    info = modeling.model_info(config.model)
    device = bench_device(config.device)
    dtype = modeling.pick_dtype(config.dtype, device)
    long_content, long_tokens = "", 0
    if config.long_prompt_tokens:
        tokenizer = modeling.load_tokenizer(config.model)
        long_content, long_tokens = long_prompt(tokenizer, config.long_prompt_tokens)
        if long_tokens + LONG_PROMPT_NEW_TOKENS > info.max_context:  # kaizen serve's limit
            raise ValueError(
                f"--long-prompt-tokens: {long_tokens} and {LONG_PROMPT_NEW_TOKENS} new tokens "
                f"exceed the model's context of {info.max_context} tokens"
            )
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="kaizen-bench-serve-") as tmp:
        say(f"starting kaizen serve on {info.name} ({config.dtype}, {device}) in {tmp}")
        with kaizen_server(
            config.model.resolve(),
            Path(tmp),
            config.concurrency,
            config.new_tokens,
            config.dtype,
            extra=("--device", str(device), *shlex.split(config.server_args)),
        ) as server:
            serving = BASE_VERSION
            if config.lora_rank:
                say(f"publishing a rank-{config.lora_rank} LoRA adapter (B = 0) to serve")
                adapter = zero_adapter(config.model, Path(tmp) / "adapter", config.lora_rank)
                serving = publish(Registry(server.registry_dir), adapter, info.name)
                wait_serving_version(server.channel, serving)
            warm_up(server.channel, config.new_tokens, config.concurrency)
            say(
                f"load: {config.requests} requests of {config.new_tokens} tokens, "
                f"{config.concurrency} at a time"
            )
            load = run_load(
                server.channel, config.requests, config.concurrency, config.new_tokens, 1
            )
            phase = None
            if long_tokens:
                say(
                    f"long prompt: {long_tokens} tokens arrive while "
                    f"{config.concurrency - 1} streams decode"
                )
                phase = run_long_prompt(
                    server.channel,
                    config.concurrency,
                    config.new_tokens,
                    long_content,
                    LONG_PROMPT_NEW_TOKENS,
                    first_seed=1 + config.requests,
                )
        server_exit_code = server.exit_code

    say("baselines in this process: batched model.generate, then one request at a time")
    batched, naive, prompts = generate_baselines(config, device, dtype)
    server_tps = load.tokens_per_s
    tokens = [r.completion_tokens for r in load.ok]
    mean_context = sum(len(p) for p in prompts) / len(prompts) + config.new_tokens / 2
    say("the floor: the bare decode step at the same batch and context, no engine around it")
    context = round(mean_context)
    floor_ms = decode_floor(config.model, prompts[0], config.concurrency, context, dtype, device)
    step_ms = 1000 * config.concurrency / server_tps if server_tps else None
    latency = load.latency_ms()
    return {
        "server_tokens_per_s": round(server_tps, 1),
        "generate_batched_tokens_per_s": round(batched, 1),
        "naive_tokens_per_s": round(naive, 1),
        "ratio_vs_batched_generate": round(server_tps / batched, 3),
        "ratio_vs_naive": round(server_tps / naive, 3),
        "floor_step_ms": round(floor_ms, 2),
        "step_ms": round(step_ms, 2) if step_ms else None,
        "engine_overhead": round(step_ms / floor_ms, 3) if step_ms else None,
        **latency,
        **long_prompt_figures(phase, long_tokens, latency["itl_p99_ms"]),
        "serving_version": serving,
        "answers_on_serving_version": sum(r.model_version == serving for r in load.ok),
        "lora_rank": config.lora_rank,
        "concurrency": config.concurrency,
        "requests": config.requests,
        "new_tokens": config.new_tokens,
        "naive_requests": config.naive_requests,
        "failed_requests": len(load.records) - len(load.ok),
        "failed_by_code": load.errors,
        "completion_tokens_min": min(tokens, default=0),
        "completion_tokens_max": max(tokens, default=0),
        "server_wall_s": round(load.wall_s, 2),
        "server_exit_code": server_exit_code,
        **bandwidth(config.model, device, dtype, server_tps, config.concurrency, mean_context),
        **environment(device, dtype, info.name),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def generate_baselines(
    config: ServeBench, device: torch.device, dtype: torch.dtype
) -> tuple[float, float, list[list[int]]]:
    """Tokens/s of batched `model.generate` over the N prompts, and of batch 1 over K of them."""
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_model(config.model, device, dtype)
    prompts = [
        modeling.chat_prompt_ids(
            tokenizer, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        )
        for i in range(config.requests)
    ]
    pad_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    generate(model, prompts[: config.concurrency], min(config.new_tokens, 8), pad_id, device)
    batches = math.ceil(len(prompts) / config.concurrency)
    tokens, elapsed_s = 0, 0.0
    for b in range(batches):
        chunk = prompts[b * config.concurrency : (b + 1) * config.concurrency]
        elapsed_s += generate(model, chunk, config.new_tokens, pad_id, device)
        tokens += len(chunk) * config.new_tokens
    batched_tps = tokens / elapsed_s
    naive_s = sum(
        generate(model, [prompt], config.new_tokens, pad_id, device)
        for prompt in prompts[: config.naive_requests]
    )
    naive_tps = config.naive_requests * config.new_tokens / naive_s
    return batched_tps, naive_tps, prompts


def zero_adapter(model_dir: Path, out: Path, rank: int) -> Path:
    """A LoRA adapter of `rank` on the modules kaizen learns (q and v) as peft initialises
    one, B = 0: it costs what any adapter of its shape costs, and its answers are the base
    model's, so the text streams (and their TTFT and inter-token figures) compare with a
    run on the base model. A random one would stream garbage whose multi-token
    characters hold text chunks back."""
    from peft import LoraConfig, get_peft_model

    base = modeling.load_model(model_dir, torch.device("cpu"), torch.float32)
    shape = {**LORA, "r": rank, "lora_alpha": 2 * rank}
    get_peft_model(base, LoraConfig(**shape)).save_pretrained(out)
    return out


LONG_PROMPT_NEW_TOKENS = 4  # the long request's own answer: what it costs is its prefill


def bench_device(requested: str) -> torch.device:
    """The device of the server, the baselines and the floor; a bad --device fails here,
    before a server starts."""
    try:
        device = modeling.pick_device(requested)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: auto, cpu, cuda or cuda:N, got {requested!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device: {requested} is not among this machine's CUDA devices")
    return device


def long_prompt(tokenizer, tokens: int) -> tuple[str, int]:
    """One user message of the shipped prompts repeated, cut so that its chat-templated
    prompt is `tokens` tokens (or a token or two fewer: text cut mid-word can re-tokenize
    longer); the message and that length."""

    def templated(content: str) -> int:
        return len(modeling.chat_prompt_ids(tokenizer, [{"role": "user", "content": content}]))

    overhead = templated("")
    if tokens <= overhead:
        raise ValueError(
            f"--long-prompt-tokens: the chat template alone is {overhead} tokens; "
            f"ask for more, or 0 to skip the phase"
        )
    text = " ".join(PROMPTS * (tokens // len(PROMPTS) + 1))  # each prompt is several tokens
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = tokens - overhead
    while True:
        content = tokenizer.decode(ids[:keep])
        length = templated(content)
        if length <= tokens:
            return content, length
        keep -= length - tokens


def long_prompt_figures(
    phase: LongPromptResult | None, tokens: int, itl_p99_ms: float | None
) -> dict[str, object]:
    """The long-prompt phase: the other streams' inter-token p99 while it was served, and
    its ratio to the main load's; None throughout when the phase was skipped."""
    if phase is None:
        return {
            "long_prompt_tokens": 0,
            "long_prompt_ttft_ms": None,
            "itl_p99_ms_with_long_prompt": None,
            "itl_p99_ratio_long_prompt": None,
            "long_prompt_failed_by_code": {},
        }
    p99_s = percentile(phase.others_itl_s(), 99)
    p99_ms = None if p99_s is None else round(1000 * p99_s, 1)
    ttft_s = phase.long.ttft_s
    records = [*phase.others, phase.long]
    return {
        "long_prompt_tokens": phase.long.prompt_tokens if phase.long.ok else tokens,
        "long_prompt_ttft_ms": None if ttft_s is None else round(1000 * ttft_s, 1),
        "itl_p99_ms_with_long_prompt": p99_ms,
        "itl_p99_ratio_long_prompt": round(p99_ms / itl_p99_ms, 3)
        if p99_ms and itl_p99_ms
        else None,
        "long_prompt_failed_by_code": dict(Counter(r.error for r in records if not r.ok)),
    }


FLOOR_STEPS = 16  # timed bare decode steps (after two untimed ones)


@torch.inference_mode()
def decode_floor(
    model_dir: Path,
    prompt: list[int],
    concurrency: int,
    context: int,
    dtype: torch.dtype,
    device: torch.device,
) -> float:
    """Median milliseconds of one bare decode step: the same model's forward over
    `concurrency` rows with `context` tokens each in the engine's slot KV cache, and
    nothing else (no queue, no sampling, no adapter, no streaming): the floor the engine's
    step is compared with (`engine_overhead`)."""
    from server.engine import attention_mask
    from server.kvcache import SlotCache

    model = modeling.load_model(model_dir, device, dtype)
    cache = SlotCache(model.config, concurrency, context + FLOOR_STEPS + 3, dtype, device)
    slots = [cache.take() for _ in range(concurrency)]
    ids = (prompt * math.ceil(context / len(prompt)))[:context]
    mask, positions = cache.plan_prefill(slots, [context] * concurrency, context)
    model(
        input_ids=torch.tensor([ids] * concurrency, device=device),
        attention_mask=attention_mask(model, mask),
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    next_ids = torch.full((concurrency, 1), ids[-1], device=device)
    times = []
    for _ in range(FLOOR_STEPS + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        mask, positions = cache.plan_decode(slots)
        out = model(
            input_ids=next_ids,
            attention_mask=attention_mask(model, mask),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        next_ids = out.logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[2:])


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in the checkpoint (a tied embedding counts once), from the headers."""
    from safetensors import safe_open

    count = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                count += math.prod(f.get_slice(key).get_shape())
    return count


# Peak memory bandwidth (GB/s) of the cards a GPU run may land on, by name fragment.
PEAK_BANDWIDTH_GB_S = {"H200": 4800, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350}


def bandwidth(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    tokens_per_s: float,
    concurrency: int,
    mean_context: float,
) -> dict[str, object]:
    """Decode speed as a fraction of the card's memory-bandwidth limit (GPU runs only)."""
    if device.type != "cuda":
        return {}
    width = torch.tensor([], dtype=dtype).element_size()
    return decode_bandwidth(
        model_dir,
        width,
        tokens_per_s,
        concurrency,
        mean_context,
        torch.cuda.get_device_name(device),
    )


def decode_bandwidth(
    model_dir: Path,
    bytes_per_value: int,
    tokens_per_s: float,
    concurrency: int,
    mean_context: float,
    gpu_name: str,
) -> dict[str, object]:
    """Each decode step reads every weight once and each row's KV cache; at `tokens_per_s`
    with `concurrency` rows that is `tokens_per_s / concurrency` steps a second."""
    from transformers import AutoConfig

    from server.kvcache import attention_shape  # the shape the server's cache is built from

    config = AutoConfig.from_pretrained(model_dir)
    weights = parameter_count(model_dir) * bytes_per_value
    _, kv_heads, head_dim = attention_shape(config)
    layers = config.get_text_config().num_hidden_layers
    kv_per_token = 2 * layers * kv_heads * head_dim * bytes_per_value
    step_bytes = weights + concurrency * mean_context * kv_per_token
    achieved = step_bytes * tokens_per_s / concurrency / 1e9
    peak = next((v for k, v in PEAK_BANDWIDTH_GB_S.items() if k in gpu_name), None)
    return {
        "gpu": gpu_name,
        "bytes_per_decode_step": int(step_bytes),
        "achieved_bandwidth_gb_s": round(achieved, 1),
        "peak_bandwidth_gb_s": peak,
        "bandwidth_fraction": round(achieved / peak, 3) if peak else None,
    }


def generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int, device) -> float:
    """One left-padded `model.generate` of exactly `new_tokens` sampled tokens; its seconds."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (B, width)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=0,  # the server samples from the whole vocabulary; HF's default is 50
            min_new_tokens=new_tokens,  # EOS is masked until then: exactly new_tokens each
            max_new_tokens=new_tokens,
            pad_token_id=pad_id,
        )  # (B, width + new_tokens)
    _sync(device)
    elapsed_s = time.perf_counter() - started
    if out.shape[1] != width + new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - width} tokens, not {new_tokens}")
    return elapsed_s


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
