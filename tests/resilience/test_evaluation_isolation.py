"""Evaluation leaves the training stream alone: random states (an eval DataLoader draws from torch's generator) and
bitsandbytes' 4-bit base weights (repacked for a bf16 kernel the first time they run in eval mode on AVX512-BF16)."""

from __future__ import annotations

import random

import numpy as np
import torch

from lorabox.train.resilience import determinism


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_an_eval_loader_moves_the_torch_stream_and_streams_untouched_undoes_it():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    iter(torch.utils.data.DataLoader([1, 2, 3]))  # what Trainer.evaluate does: the base seed comes from torch
    assert draws()[2] != expected[2]
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    with determinism.streams_untouched():
        iter(torch.utils.data.DataLoader([1, 2, 3]))
        draws()
    assert draws() == expected


def test_keep_base_layout_stops_the_cpu_repacking_of_4bit_weights():
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4"))
    model[0].weight = bnb.nn.Params4bit(model[0].weight.data, requires_grad=False, quant_type="nf4").to("cpu")
    model[0].support_avx512bf16_for_cpu = True  # as on a CPU with AVX512-BF16, where eval would repack the weights
    assert determinism.keep_base_layout(model) == 1
    assert model[0].support_avx512bf16_for_cpu is False
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 64))
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
