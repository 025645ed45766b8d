"""Model shapes the planner knows offline: the built-in table, config.json fields → ModelShape, recipes' model.shape."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorabox.env.memory import ModelShape

# Every row copies the fields of the model's published config.json on the Hugging Face Hub (the repository named by
# the key; for Gemma 3 4B-27B its text_config). Variants that publish the same shape (-Instruct, -it, -chat, -hf,
# -Base, -pt) share a row: lookups drop those words, so they are not listed twice.
Config = dict[str, int | bool]


def _config(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    tied: bool = False,
    head_dim: int | None = None,
    experts: tuple[int, int] | None = None,
) -> Config:
    """The config.json fields the planner reads, under their config.json names."""
    config: Config = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
    }
    if head_dim is not None:
        config["head_dim"] = head_dim
    if experts is not None:
        config["num_local_experts"], config["num_experts_per_tok"] = experts
    return config


LLAMA_3_8B = _config(4096, 14336, 32, 32, 8, 128256)
LLAMA_3_70B = _config(8192, 28672, 80, 64, 8, 128256)
PHI_3_MINI = _config(3072, 8192, 32, 32, 32, 32064)
MISTRAL_7B = _config(4096, 14336, 32, 32, 8, 32000)

BUILTIN: dict[str, Config] = {
    # Llama 2 / 3.x: config.json of each meta-llama repository
    "meta-llama/Llama-2-7b": _config(4096, 11008, 32, 32, 32, 32000),
    "meta-llama/Llama-2-13b": _config(5120, 13824, 40, 40, 40, 32000),
    "meta-llama/Llama-2-70b": _config(8192, 28672, 80, 64, 8, 32000),
    "meta-llama/Meta-Llama-3-8B": LLAMA_3_8B,
    "meta-llama/Meta-Llama-3-70B": LLAMA_3_70B,
    "meta-llama/Llama-3.1-8B": LLAMA_3_8B,
    "meta-llama/Meta-Llama-3.1-8B": LLAMA_3_8B,  # the repository's earlier name
    "meta-llama/Llama-3.1-70B": LLAMA_3_70B,
    "meta-llama/Meta-Llama-3.1-70B": LLAMA_3_70B,
    "meta-llama/Llama-3.3-70B": LLAMA_3_70B,  # published as -Instruct only
    "meta-llama/Llama-3.2-1B": _config(2048, 8192, 16, 32, 8, 128256, tied=True, head_dim=64),
    "meta-llama/Llama-3.2-3B": _config(3072, 8192, 28, 24, 8, 128256, tied=True, head_dim=128),
    # CodeLlama: config.json of codellama/CodeLlama-*-hf (7B/13B/70B add 16 infilling tokens to Llama 2's 32000)
    "codellama/CodeLlama-7b": _config(4096, 11008, 32, 32, 32, 32016),
    "codellama/CodeLlama-13b": _config(5120, 13824, 40, 40, 40, 32016),
    "codellama/CodeLlama-34b": _config(8192, 22016, 48, 64, 8, 32000),
    "codellama/CodeLlama-70b": _config(8192, 28672, 80, 64, 8, 32016),
    # Mistral / Mixtral: config.json of the mistralai repositories (v0.3 extends the vocabulary to 32768)
    "mistralai/Mistral-7B-v0.1": MISTRAL_7B,
    "mistralai/Mistral-7B-v0.2": MISTRAL_7B,
    "mistralai/Mistral-7B-v0.3": _config(4096, 14336, 32, 32, 8, 32768),
    "mistralai/Mixtral-8x7B-v0.1": _config(4096, 14336, 32, 32, 8, 32000, experts=(8, 2)),
    # Qwen2.5: config.json of Qwen/Qwen2.5-*-Instruct (base models publish the same shapes)
    "Qwen/Qwen2.5-0.5B": _config(896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen/Qwen2.5-1.5B": _config(1536, 8960, 28, 12, 2, 151936, tied=True),
    "Qwen/Qwen2.5-3B": _config(2048, 11008, 36, 16, 2, 151936, tied=True),
    "Qwen/Qwen2.5-7B": _config(3584, 18944, 28, 28, 4, 152064),
    "Qwen/Qwen2.5-14B": _config(5120, 13824, 48, 40, 8, 152064),
    "Qwen/Qwen2.5-32B": _config(5120, 27648, 64, 40, 8, 152064),
    # Qwen3: config.json of Qwen/Qwen3-* (head_dim 128 throughout, which is not hidden / heads for 0.6B, 4B, 32B)
    "Qwen/Qwen3-0.6B": _config(1024, 3072, 28, 16, 8, 151936, tied=True, head_dim=128),
    "Qwen/Qwen3-1.7B": _config(2048, 6144, 28, 16, 8, 151936, tied=True, head_dim=128),
    "Qwen/Qwen3-4B": _config(2560, 9728, 36, 32, 8, 151936, tied=True, head_dim=128),
    "Qwen/Qwen3-8B": _config(4096, 12288, 36, 32, 8, 151936, head_dim=128),
    "Qwen/Qwen3-14B": _config(5120, 17408, 40, 40, 8, 151936, head_dim=128),
    "Qwen/Qwen3-32B": _config(5120, 25600, 64, 64, 8, 151936, head_dim=128),
    # Gemma 2 / 3: config.json of google/gemma-* (tied embeddings; a 256k vocabulary, so large logits)
    "google/gemma-2-2b": _config(2304, 9216, 26, 8, 4, 256000, tied=True, head_dim=256),
    "google/gemma-2-9b": _config(3584, 14336, 42, 16, 8, 256000, tied=True, head_dim=256),
    "google/gemma-2-27b": _config(4608, 36864, 46, 32, 16, 256000, tied=True, head_dim=128),
    "google/gemma-3-1b": _config(1152, 6912, 26, 4, 1, 262144, tied=True, head_dim=256),
    # 4B-27B are image-text models: the planner counts their language model (text_config), not the vision tower
    "google/gemma-3-4b": _config(2560, 10240, 34, 8, 4, 262208, tied=True, head_dim=256),
    "google/gemma-3-12b": _config(3840, 15360, 48, 16, 8, 262208, tied=True, head_dim=256),
    "google/gemma-3-27b": _config(5376, 21504, 62, 32, 16, 262208, tied=True, head_dim=128),
    # Phi-3 / Phi-4: config.json of the microsoft repositories (published as -instruct except phi-4)
    "microsoft/Phi-3-mini-4k": PHI_3_MINI,
    "microsoft/Phi-3-mini-128k": PHI_3_MINI,
    "microsoft/Phi-3.5-mini": PHI_3_MINI,
    "microsoft/Phi-3-medium-4k": _config(5120, 17920, 40, 40, 10, 32064),
    "microsoft/Phi-3-medium-128k": _config(5120, 17920, 40, 40, 10, 32064),
    "microsoft/phi-4": _config(5120, 17920, 40, 40, 10, 100352),
    "microsoft/Phi-4-mini": _config(3072, 8192, 32, 24, 8, 200064, tied=True),
}

# Words that name a variant publishing its base model's shape, wherever they sit in the id (Mistral puts -Instruct
# before the version: Mistral-7B-Instruct-v0.2).
VARIANT = re.compile(r"-(instruct|it|chat|hf|base|pt)(?=-|$)")


def canonical(hub_id: str) -> str:
    """The table key a Hub id falls under: lower case, variant words dropped."""
    return VARIANT.sub("", hub_id.strip().lower())


_BY_KEY = {canonical(hub_id): hub_id for hub_id in BUILTIN}


def builtin(hub_id: str) -> tuple[str, Config] | None:
    """(the table's id, its config fields) for a built-in model or one of its variants; None otherwise."""
    found = _BY_KEY.get(canonical(hub_id))
    return None if found is None else (found, BUILTIN[found])


def shape_from_config(config: dict, name: str) -> ModelShape:
    """A ModelShape from config.json's fields (a multimodal config's text_config holds the language model)."""
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    experts = text.get("num_local_experts") or 0
    return ModelShape(
        name=name,
        hidden=int(text["hidden_size"]),
        layers=int(text["num_hidden_layers"]),
        intermediate=int(text["intermediate_size"]),
        heads=heads,
        kv_heads=int(text.get("num_key_value_heads") or heads),
        vocab=int(text["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        head_dim=int(text["head_dim"]) if text.get("head_dim") else None,
        experts=int(experts),
        experts_per_token=int(text.get("num_experts_per_tok") or 0) if experts else 0,
    )


class ShapeSection(BaseModel):
    """The model's shape for the planner, under config.json's field names (for a model it cannot look up offline)."""

    model_config = ConfigDict(extra="forbid")  # like every recipe section

    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(None, gt=0, description="absent: as many as num_attention_heads")
    head_dim: int | None = Field(None, gt=0, description="absent: hidden_size / num_attention_heads")
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    num_local_experts: int | None = Field(None, gt=0, description="mixture of experts: experts per layer")
    num_experts_per_tok: int | None = Field(None, gt=0, description="mixture of experts: experts each token uses")

    @model_validator(mode="after")
    def _consistent(self) -> ShapeSection:
        heads, kv = self.num_attention_heads, self.num_key_value_heads or self.num_attention_heads
        problems = []
        if self.head_dim is None and self.hidden_size % heads:
            problems.append(
                f"num_attention_heads={heads} does not divide hidden_size={self.hidden_size}; "
                "give head_dim as config.json does"
            )
        if heads % kv:
            problems.append(f"num_key_value_heads={kv} does not divide num_attention_heads={heads}")
        experts, per_token = self.num_local_experts, self.num_experts_per_tok
        if (experts is None) != (per_token is None) or (experts and per_token and per_token > experts):
            problems.append(
                f"num_local_experts={experts} and num_experts_per_tok={per_token}: a mixture of experts needs "
                "both, with num_experts_per_tok <= num_local_experts"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
