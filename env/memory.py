"""Peak GPU memory of one QLoRA training step from the model's shape and the run's settings (pure arithmetic).

Every term counts the bytes that live tensors hold at the step's peak, derived op by op from the code that runs
(transformers 5 Llama, PEFT LoRA, bitsandbytes Linear4bit, TRL's fused LM head, Liger kernels). Nothing here was
fitted to a measurement: tests/perf/test_memory.py prints the predictions next to five peaks of the seed recipe
measured on an H100 (listed in that test) as a documented comparison. The one modelling choice the measurements
informed is that the seed recipe ran peft's prepare_model_for_kbit_training (norms, embeddings and lm_head upcast to
fp32, so the residual stream is fp32): its 7B→8B Liger difference and its no-checkpointing peak only add up that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lorabox.env.report import GIB  # the one shared GiB; the planner's modules import it from here

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LossKernel = Literal["full_logits", "liger_flce", "trl_chunked"]

# bitsandbytes NF4: 4 bits per weight, one absmax per 64-weight block. Without double quant the absmax is fp32
# (4/64 B per weight); with it the absmax is a uint8 (1/64) plus one fp32 second-level absmax per 256 blocks.
NF4_BYTES = 0.5
QUANT_CONSTANT_BYTES = {False: 4 / 64, True: 1 / 64 + 4 / (64 * 256)}
# Bytes of optimizer state per trainable parameter. bnb 8-bit: two uint8 moments + an fp32 absmax per 256-block
# each; torch AdamW keeps two moments in the parameter's dtype ("param" is resolved against lora_bytes below).
OPTIMIZER_STATE_BYTES: dict[str, float | str] = {
    "paged_adamw_8bit": 2 + 2 * 4 / 256,
    "adamw_8bit": 2 + 2 * 4 / 256,
    "paged_adamw_32bit": 8.0,
    "adamw_torch": "param",
    "adamw_torch_fused": "param",
    "adafactor": 0.1,  # factored second moment: rows + columns, a few % of the matrix
    "sgd": 0.0,  # HF's SGD has no momentum by default
}
# TRL's fused LM head (trl/kernels/chunked_logprob.py): tiles of 4096 tokens x 32768 vocabulary entries.
TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
# Not in torch's allocator, still on the card: CUDA context, cuBLAS/cuDNN workspaces (typically 0.3-0.6 GiB on
# recent drivers; an assumption, not measured here) and the caching allocator's slack over what is allocated.
CUDA_CONTEXT_BYTES = int(0.5 * GIB)
ALLOCATOR_SLACK = 0.08


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only model as its config.json describes it (Llama-style layers; Mixtral-style experts optional)."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None  # config.json's head_dim where it is not hidden / heads (Gemma, Qwen3)
    experts: int = 0  # num_local_experts of a mixture-of-experts model; 0: dense
    experts_per_token: int = 0  # num_experts_per_tok: the experts each token is routed through

    @property
    def moe(self) -> bool:
        return self.experts > 0

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.head_size * self.kv_heads

    @property
    def active_experts(self) -> int:
        """MLPs a token passes through: 1 for a dense model."""
        return self.experts_per_token if self.moe else 1

    def projection_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer (of one expert, for the MLP)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_modules(self) -> tuple[str, ...]:
        """The projections that are nn.Linear modules, which bitsandbytes quantises and LoRA can target.
        transformers 5 stores a mixture of experts' MLPs as fused 3D parameters (MixtralExperts.gate_up_proj,
        down_proj): bitsandbytes replaces only nn.Linear, and PEFT's target_modules match modules, so those stay
        unquantised and without adapters (checked with transformers 5.23, peft 0.21)."""
        return tuple(p for p in PROJECTIONS if not (self.moe and p in MLP_PROJECTIONS))

    def linear_params(self) -> int:
        """Parameters of the quantised nn.Linear projections."""
        dims = self.projection_dims()
        return self.layers * sum(dims[p][0] * dims[p][1] for p in self.linear_modules())

    def expert_params(self) -> int:
        """Parameters of a mixture of experts' fused expert tensors and router, all resident; 0 for a dense model."""
        return self.layers * self.experts * (3 * self.hidden * self.intermediate + self.hidden)


# Planner presets (7B and 8B are the shapes the seed baseline was measured on); Hub models: env/shapes.py.
SHAPES: dict[str, ModelShape] = {
    "1b": ModelShape("Llama-3.2-1B", 2048, 16, 8192, 32, 8, 128256, tied_embeddings=True),
    "7b": ModelShape("Llama-2-7B", 4096, 32, 11008, 32, 32, 32016),
    "8b": ModelShape("Llama-3-8B", 4096, 32, 14336, 32, 8, 128256),
    # mirrors train/tiny_model.py SHAPES["tiny-llama"] (tests/perf checks they agree)
    "bundled:tiny-llama": ModelShape("tiny-llama", 128, 2, 256, 4, 2, 1024),
}


@dataclass(frozen=True)
class RunSettings:
    """Everything about a run that changes its memory; defaults are lorabox's own path (TRL SFTTrainer)."""

    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    load_in_4bit: bool = True
    double_quant: bool = True
    compute_bytes: int = 2  # bf16/fp16 autocast; 4 for fp32
    lora_r: int = 16
    lora_targets: tuple[str, ...] = PROJECTIONS
    lora_dropout: float = 0.05
    # fp32 adapters: PEFT's default, which LoraboxTrainer restores after TRL's bf16 cast (2 only under FSDP, where
    # adapters share the 4-bit storage dtype); env.runplan.RunPlan sets it from its adapter_dtype decision
    lora_bytes: int = 4
    upcast_non_quantized: bool = False  # peft.prepare_model_for_kbit_training: norms/embeddings/lm_head to fp32
    checkpoint_every: int = 1  # 0 off, 1 every layer, n: every n-th layer (transformers' every_n_layers)
    optimizer: str = "paged_adamw_8bit"
    liger: bool = False  # Liger RMSNorm/RoPE/SwiGLU layer kernels
    loss_kernel: LossKernel = "trl_chunked"  # TRL >= 1.16 SFTTrainer never materialises the logits
    attention_mask: bool = True  # a padding or packing mask makes SDPA expand GQA's k/v to all heads
    attention: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    fsdp_shards: int = 1  # FSDP FULL_SHARD across this many GPUs: each holds 1/n of the base and the adapters

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


def checkpointed_layers(shape: ModelShape, every: int) -> int:
    # transformers checkpoints layer i when i % every_n_layers == 0
    return 0 if every <= 0 else math.ceil(shape.layers / every)


@dataclass
class Estimate:
    """The predicted peak and the terms it is made of (bytes)."""

    shape: ModelShape
    settings: RunSettings
    components: dict[str, int] = field(default_factory=dict)
    phase: str = ""  # which moment of the step holds the peak

    @property
    def peak_allocated(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated()."""
        return sum(self.components.values())

    @property
    def planned_peak(self) -> int:
        """What the card must have free: allocated + allocator slack + CUDA context."""
        return int(self.peak_allocated * (1 + ALLOCATOR_SLACK)) + CUDA_CONTEXT_BYTES

    def to_dict(self) -> dict:
        return {
            "model": self.shape.name,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.settings).items()},
            "components_bytes": dict(self.components),
            "peak_phase": self.phase,
            "peak_allocated_bytes": self.peak_allocated,
            "planned_peak_bytes": self.planned_peak,
        }


def layer_activation_bytes_per_token(shape: ModelShape, s: RunSettings) -> float:
    """Bytes one decoder layer keeps for backward, per token, when it is not checkpointed."""
    h, i, q, kv, c = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, s.compute_bytes
    stream = 4 if s.upcast_non_quantized else c  # residual-stream dtype: bnb returns outputs in the input's dtype
    targets = set(s.lora_targets) & set(shape.linear_modules())
    # HF RMSNorm saves its fp32 copy of the input for pow(); Liger's saves the input in its own dtype.
    norm = stream * h if s.liger else 4 * h

    def lora_inputs(group: tuple[str, ...], width: int) -> float:
        hit = [p for p in group if p in targets]
        if not hit:
            return 0  # the frozen 4-bit matmul needs only its weight for backward
        if s.lora_dropout > 0:  # each projection: its own dropout mask (bool) + the dropped input lora_A saves
            return len(hit) * (1 + c) * width
        # one shared input; a fp32 stream is cast to the compute dtype once per projection by autocast
        return (1 if stream == c else len(hit)) * c * width

    # SDPA uses native GQA only without a mask; eager always repeats k/v to all heads; flash-attention never does
    expanded = s.attention == "eager" or (s.attention == "sdpa" and s.attention_mask)
    kv_saved = 2 * (q if expanded else kv)
    attention = (
        lora_inputs(("q_proj", "k_proj", "v_proj"), h)
        + c * (q + kv_saved)  # q, k after RoPE and v, as the attention kernel saves them
        + c * q  # attention output
        + 4 * shape.heads  # the fused kernels' logsumexp
        + (lora_inputs(("o_proj",), q) if "o_proj" in targets else 0)
    )
    if s.attention == "eager":
        # eager materialises the scores: softmax's fp32 output and its compute-dtype copy, heads x seq per token
        attention += (4 + c) * shape.heads * s.seq_len
    # gate/up outputs come out in the stream dtype; HF saves gate (silu), silu(gate) and up (mul), Liger's fused
    # SwiGLU saves gate and up only.
    mlp = lora_inputs(("gate_proj", "up_proj"), h) + (2 if s.liger else 3) * stream * i
    mlp += lora_inputs(("down_proj",), i) if "down_proj" in targets else 0
    if shape.moe:
        # each token runs through its top-k experts, each keeping the MLP's tensors for its share of the tokens, plus
        # the token's hidden state gathered per expert and the router's fp32 logits
        mlp = shape.active_experts * (mlp + stream * h) + 4 * shape.experts
    lora_b_inputs = len(targets) * s.lora_r * c  # lora_B saves lora_A's output
    return 2 * norm + attention + mlp + lora_b_inputs


def lora_params(shape: ModelShape, s: RunSettings) -> int:
    dims = shape.projection_dims()
    modules = shape.linear_modules()
    return shape.layers * sum(s.lora_r * (dims[p][0] + dims[p][1]) for p in s.lora_targets if p in modules)


def estimate(shape: ModelShape, s: RunSettings) -> Estimate:
    """Peak allocated bytes of a training step, with its breakdown."""
    h, v, c, t = shape.hidden, shape.vocab, s.compute_bytes, s.tokens
    stream = 4 if s.upcast_non_quantized else c
    plain_bytes = 4 if s.upcast_non_quantized else c
    out: dict[str, int] = {}

    n_linear, shards = shape.linear_params(), max(1, s.fsdp_shards)
    weights = n_linear * NF4_BYTES if s.load_in_4bit else n_linear * c
    out["base weights (NF4)" if s.load_in_4bit else "base weights"] = int(weights / shards)
    if shards > 1:
        # FULL_SHARD with one FSDP unit per decoder layer: a GPU gathers the whole layer it computes and, with
        # backward prefetch, the next one
        out["FSDP gathered layers"] = int(2 * weights / shape.layers)
    if s.load_in_4bit:
        # the quantisation state sits outside FSDP's flat parameters, so every GPU keeps all of it
        out["quantisation constants"] = int(n_linear * QUANT_CONSTANT_BYTES[s.double_quant])
    n_plain = shape.vocab * h * (1 if shape.tied_embeddings else 2) + (2 * shape.layers + 1) * h
    # the root FSDP unit (embeddings, lm_head, final norm) stays gathered for the whole step
    out["embeddings, lm_head, norms"] = n_plain * plain_bytes
    if shape.moe:
        # unquantised like the embeddings (so fp32 after prepare_model_for_kbit_training), sharded under FSDP
        out["MoE experts + router (unquantised)"] = shape.expert_params() * plain_bytes // shards

    n_lora = lora_params(shape, s)
    state = OPTIMIZER_STATE_BYTES.get(s.optimizer, 8.0)
    state = 2 * s.lora_bytes if state == "param" else state
    # under FSDP the adapters are flattened with their layer's weights and sharded like them
    out["LoRA params + grads"] = n_lora * 2 * s.lora_bytes // shards
    out["optimizer state"] = int(n_lora * state / shards)

    a_layer = layer_activation_bytes_per_token(shape, s) * t
    k = checkpointed_layers(shape, s.checkpoint_every)
    saved = k * stream * h * t + (shape.layers - k) * a_layer  # checkpoints keep only each layer's input
    # final norm's saved input + the compute-dtype input of lm_head
    head = ((stream if s.liger else 4) * h + c * h) * t

    if s.loss_kernel == "full_logits":
        # bf16 logits, their fp32 upcast and log_softmax's fp32 output in the forward (c + 8 B per logit); in the
        # backward log_softmax's output, nll_loss's dense fp32 gradient and log_softmax_backward's result (12 B).
        loss = max(c + 8, 12) * v * t
    elif s.loss_kernel == "liger_flce":
        # Liger computes the input gradient during the forward, chunk by chunk: grad_input + one fp32 logits chunk
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(t / math.ceil(v / h)))))
        loss = stream * h * t + 4 * v * chunk
    else:
        # TRL: compact copy of the hidden states, fp32 grad_hidden and its cast, one [4096 x 32768] tile, and a
        # compute-dtype copy of each lm_head vocabulary slice when lm_head is not in the compute dtype
        tile = min(t, TRL_TOKEN_TILE) * min(v, TRL_VOCAB_TILE) * c
        weight_cast = TRL_VOCAB_TILE * h * c if plain_bytes != c else 0
        loss = (2 * stream + 4) * h * t + tile + weight_cast

    # Backward of one layer: the incoming and the accumulated residual gradient, the MLP's intermediate gradients
    # (HF: three, Liger writes them in place: one) and one dequantised weight for the 4-bit matmul's grad_input.
    transient = (2 * stream * h + (1 if s.liger else 3) * stream * shape.intermediate) * t
    transient += shape.intermediate * h * c if s.load_in_4bit else 0
    loss_phase = head + loss
    layer_phase = (a_layer if k else 0) + transient
    out["saved activations"] = int(saved)
    if loss_phase >= layer_phase:
        out["logits and loss"] = int(loss_phase)
        phase = "loss (start of backward)"
    else:
        out["layer backward (recompute + grads)" if k else "layer backward (grads)"] = int(layer_phase)
        phase = "layer backward" + (" with recompute" if k else "")
    return Estimate(shape, s, out, phase)


def seed_settings(micro_batch: int = 4, seq_len: int = 2048, liger: bool = False, checkpoint_every: int = 1):
    """The measured seed recipe: HF Trainer + PEFT (fp32 adapters, prepare_model_for_kbit_training)."""
    return RunSettings(
        micro_batch=micro_batch,
        seq_len=seq_len,
        lora_bytes=4,
        upcast_non_quantized=True,
        checkpoint_every=checkpoint_every,
        liger=liger,
        loss_kernel="liger_flce" if liger else "full_logits",
        attention_mask=False,  # fixed-length rows: transformers drops the all-ones mask
    )
