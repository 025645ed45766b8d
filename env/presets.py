"""Recipe presets: a GPU class sets batch, length and checkpointing; a task sets LoRA; one of each composes."""

from __future__ import annotations

from typing import Any

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (what it is for, partial recipe). GPU presets set batch/length/checkpointing, task presets set LoRA,
# so one of each composes: `preset: [gpu-12gb, code]`.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpu-12gb": (
        "12 GB (RTX 3060, 3080 Ti laptop): 7B at micro-batch 1 x 1024 tokens, checkpointing on",
        {
            "training": {"micro_batch_size": 1, "gradient_accumulation": 16},
            "data": {"max_seq_len": 1024},
            "performance": {"gradient_checkpointing": "on"},
        },
    ),
    "gpu-16gb": (
        "16 GB (RTX 4080, A4000, T4 16 GB): 7B at 2 x 2048 tokens, checkpointing on",
        {
            "training": {"micro_batch_size": 2, "gradient_accumulation": 8},
            "data": {"max_seq_len": 2048},
            "performance": {"gradient_checkpointing": "on"},
        },
    ),
    "gpu-24gb": (
        "24 GB (RTX 3090/4090, A10, L4): 7-8B at 4 x 2048 tokens, checkpointing on",
        {
            "training": {"micro_batch_size": 4, "gradient_accumulation": 4},
            "data": {"max_seq_len": 2048},
            "performance": {"gradient_checkpointing": "on"},
        },
    ),
    "gpu-80gb": (
        "40-80 GB (A100 40/80, H100): 7-13B at 8 x 4096 tokens, checkpointing left to the planner",
        {
            "training": {"micro_batch_size": 8, "gradient_accumulation": 2},
            "data": {"max_seq_len": 4096},
            "performance": {"gradient_checkpointing": "auto"},
        },
    ),
    "classification": (
        "short labels from text: small rank on the attention query/value projections",
        {"lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}},
    ),
    "summarization": (
        "long input, short output: rank 16 on all attention projections",
        {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    ),
    "instruction": (
        "instruction following / chat: rank 16 on all seven linear projections",
        {"lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": list(ALL_PROJECTIONS)}},
    ),
    "code": (
        "code generation: rank 64 on all seven linear projections (new syntax needs capacity)",
        {"lora": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": list(ALL_PROJECTIONS)}},
    ),
}
