"""Per-token log-probabilities of labelled tokens, computed in chunks of tokens: what every
objective's loss is made of (lm: cross-entropy per trained token; dpo: summed per answer).

The full fp32 logits of a micro-batch are (batch, seq, vocab): at a real vocabulary (~150k) and a
real sequence they are gigabytes, and cross-entropy's backward keeps another copy of that size. So
the model is run to its final hidden states only (`logits_to_keep` selects no position for its
output head), and the head is applied here, to `train.loss_chunk_tokens` labelled tokens at a
time, each chunk upcast to fp32 on its own. Each chunk but the last runs under activation
checkpointing (non-reentrant), so backward recomputes one chunk's logits at a time instead of
keeping all of them. The last chunk's logits are kept from forward: backward starts with that
chunk (autograd runs the newest node first), so by then they are the only chunk's logits alive,
as a recomputed chunk's would be, and recomputing them would cost a head matmul and a logsumexp
for no memory. A micro-batch whose tokens fit one chunk (seq_len <= train.loss_chunk_tokens) is
then never recomputed. Positions whose label is IGNORE (prompts, padding) never reach the head.

The head is called as a module (`get_output_embeddings()`), not as a weight: a tied head is the
embedding's weight; a LoRA adapter on the head (peft) applies. Under ZeRO-3 a trainable head is
called through DeepSpeed's module hooks each chunk (they gather its weight, and again for the
recomputation in backward); a frozen one (LoRA) is gathered once per micro-batch and applied as a
plain linear map (see `head_for_chunks`). Logit soft-capping (Gemma-2) and logit scaling (Granite,
Cohere) are applied as the model's own forward applies them. A model whose forward takes no
`logits_to_keep` gets the unchunked path (full logits, then fp32), as does chunk_tokens 0.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional


def causal_lm(model: Any) -> Any:
    """The Hugging Face model under a DeepSpeed engine (`.module`) and a peft wrapper."""
    import torch

    inner = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def logps_from_logits(logits: Any, labels: Any) -> Any:
    """Log-prob of each label under logits aligned with it (labels[i]: the token after position
    i), in fp32; 0 where the label is IGNORE."""
    import torch.nn.functional as F

    from raylm.data import IGNORE

    return -F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1).long(),
                            ignore_index=IGNORE, reduction="none").view(labels.shape)


def _adjust(logits: Any, config: Any) -> Any:
    """What the model's forward does to its head's output besides returning it."""
    import torch

    scaling = getattr(config, "logits_scaling", None)  # Granite
    if scaling:
        logits = logits / scaling
    scale = getattr(config, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma-2, Gemma-3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@functools.lru_cache(maxsize=None)
def _label_logp() -> Any:
    """log_softmax(logits)[label] per row, as an autograd function whose backward makes one
    vocab-wide tensor (the softmax, turned into the gradient in place) where autograd's own
    (logsumexp, gather, their sum) makes three."""
    import torch

    class LabelLogp(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, logits: Any, labels: Any) -> Any:
            lse = torch.logsumexp(logits, dim=-1)
            ctx.save_for_backward(logits, labels, lse)
            return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            logits, labels, lse = ctx.saved_tensors
            g = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))  # -softmax x grad
            return g.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1)), None

    return LabelLogp


def _chunk_logps(head: Any, config: Any, hidden: Any, labels: Any) -> Any:
    return _label_logp().apply(_adjust(head(hidden).float(), config), labels)


def _partitioned(head: Any) -> bool:
    """ZeRO-3 has partitioned the head: its parameters carry `ds_id`."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def _frozen_linear(head: Any) -> bool:
    import torch

    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


def chunkable(model: Any) -> bool:
    """The model can be run to its hidden states without its head's full output.

    Under ZeRO-3, a head with frozen parameters is chunked only when it is a plain linear map
    (the LoRA case: peft's 'all-linear' leaves the head alone); a partly frozen head module, such
    as a LoRA adapter on the head itself, takes the unchunked path (see `head_for_chunks`)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    if head is None:
        return False
    if _partitioned(head) and any(not p.requires_grad for p in head.parameters()) and not _frozen_linear(head):
        return False
    return "logits_to_keep" in inspect.signature(lm.forward).parameters


def head_for_chunks(head: Any) -> Any:
    """What the chunks call as their head: the module itself, or under ZeRO-3 with a frozen head
    a linear map over its weight, gathered once for all the chunks.

    A trainable ZeRO-3 head can be called as a module, chunk after chunk: DeepSpeed's forward
    hooks gather its weight and release it after each call, the recomputation in backward runs
    the same hooks, torch.utils.checkpoint keeps a detached alias of the gathered weight (it
    detaches what requires grad), and the hook on the head's output gathers it once more for the
    weight's gradient: up to three gathers of the head per chunk (every rank runs as many chunks,
    see `chunk_count`), the price of its gradient reaching DeepSpeed as it expects. A frozen weight is kept as the Parameter itself, which DeepSpeed releases
    (its data becomes shape [0]) when the recomputation's forward hook ends, before backward reads
    it: checkpoint then refuses the recomputed shapes. So a frozen head is gathered here
    (GatheredParameters, modifier_rank=None: nothing is modified) and the chunks use detached
    aliases of the gathered data, which outlive the re-partitioning on exit (DeepSpeed's
    free_param swaps the parameter's data; the storage stays with the alias) until backward is
    done: one full head weight, as long as the micro-batch's graph lives."""
    import torch.nn.functional as F

    if not (_partitioned(head) and _frozen_linear(head)):
        return head
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(head.parameters()), modifier_rank=None):
        weight = head.weight.detach()
        bias = None if head.bias is None else head.bias.detach()
    return functools.partial(F.linear, weight=weight, bias=bias)


def chunk_count(module: Any, head: Any, tokens: int, chunk_tokens: int) -> int:
    """How many chunks this rank runs: enough for its tokens, and under ZeRO-3 with the head
    called as a module, the most any rank needs. Each call of a partitioned module gathers its
    weight, a collective every rank must join as often as the others; a rank with fewer labelled
    tokens runs empty chunks (the head on 0 rows, in forward and in backward alike)."""
    import torch
    import torch.distributed as dist

    count = -(-tokens // chunk_tokens)
    if head is not module or not _partitioned(module) or not dist.is_initialized():
        return count
    weight = next(module.parameters())
    most = torch.tensor([count], dtype=torch.long, device=weight.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX, group=weight.ds_process_group)
    return int(most)


def token_logps(model: Any, input_ids: Any, labels: Any, position_ids: Optional[Any] = None,
                chunk_tokens: int = 0) -> Any:
    """(B, T) fp32 log-probs of `labels` (aligned with `input_ids`: labels[:, i] follows position
    i), 0 where a label is IGNORE; `model`: a causal LM, peft-wrapped or not, or a DeepSpeed engine.

    `position_ids` (packed rows) are passed to the model, which then keeps packed examples apart;
    use_cache=False always (with a KV cache transformers skips that detection)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from raylm.data import IGNORE

    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    if chunk_tokens <= 0 or not chunkable(model):
        return logps_from_logits(model(input_ids=input_ids, use_cache=False, **kwargs).logits, labels)
    lm = causal_lm(model)
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)  # the head runs on no position
    out = model(input_ids=input_ids, use_cache=False, output_hidden_states=True, logits_to_keep=none, **kwargs)
    hidden = out.hidden_states[-1]  # the final (normed) hidden states: transformers ties them to last_hidden_state
    flat = labels.reshape(-1)
    where = (flat != IGNORE).nonzero().squeeze(-1)
    picked, targets = hidden.reshape(-1, hidden.size(-1)).index_select(0, where), flat.index_select(0, where).long()
    module = lm.get_output_embeddings()
    head, config = head_for_chunks(module), lm.config
    pieces = []
    last = (chunk_count(module, head, len(where), chunk_tokens) - 1) * chunk_tokens  # the same on every rank
    for i in range(0, last + chunk_tokens, chunk_tokens):
        h, y = picked[i:i + chunk_tokens], targets[i:i + chunk_tokens]
        if torch.is_grad_enabled() and i < last:  # the last chunk: kept, not recomputed (see above)
            pieces.append(checkpoint(_chunk_logps, head, config, h, y, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(head, config, h, y))
    logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(flat.shape, dtype=torch.float32, device=flat.device).index_put((where,), logps).view(labels.shape)
