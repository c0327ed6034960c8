"""Attention over packed rows, one document at a time, with PyTorch SDPA: `sdpa_varlen`.

A packed row holds several documents, each with position ids from 0. transformers' own `sdpa`
attends such a row through a block-diagonal causal mask, and the kernel computes every pair of
the row, masked or not: a row of width W costs W^2 however short its documents. flash-attn's
varlen kernel (GPU) computes only the pairs inside each document. `sdpa_varlen` does the same
with SDPA, on any device: the documents' queries, keys and values are gathered into
right-padded blocks, documents of similar length together, and each block is one causal SDPA
call. Right padding under a causal mask never reaches a real query, so no mask is needed and the
result is the masked row's (tested against it).

Registered with transformers' AttentionInterface by register_sdpa_varlen(). A batch comes with its `DocumentLayout`
(CLLM4Rec.hidden_states passes it); without one, for instance for a padded batch with an
attention mask or for generation with a KV cache, the call is transformers' plain sdpa.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

SDPA_VARLEN = "sdpa_varlen"


@dataclass
class DocumentLayout:
    """Where each document of a packed (rows, width) batch goes in the padded blocks, whose slots
    are laid end to end. blocks: (documents, length) of each block, in slot order.

    position_of_slot: the batch position (row-major) each slot reads; a padding slot reads its
    document's last position again. slot_of_position: each batch position's own slot.
    position_or_none: position_of_slot, with padding slots pointing one past the last position."""
    position_of_slot: torch.Tensor
    slot_of_position: torch.Tensor
    position_or_none: torch.Tensor
    blocks: list[tuple[int, int]]


def document_layout(position_ids: torch.Tensor) -> DocumentLayout:
    """The layout of a packed batch whose documents restart their position ids at 0 (a row's
    padding tail counts as one more document). Documents are grouped by length so that no
    document is padded to more than twice its length: a block costs at most 4x its documents'
    own attention pairs."""
    num_rows, width = position_ids.shape
    flat = position_ids.reshape(-1).cpu()
    if (flat[::width] != 0).any():
        raise ValueError("sdpa_varlen: every row of a packed batch must begin a document (position id 0)")
    starts = torch.nonzero(flat == 0).flatten()
    lengths = torch.diff(starts, append=torch.tensor([flat.numel()]))
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    position_of_slot, position_or_none, blocks = [], [], []
    slot_of_position = torch.empty(flat.numel(), dtype=torch.long)
    slot = k = 0
    while k < len(order):
        block_len, count = int(lengths[order[k]]), 0
        while k < len(order) and 2 * int(lengths[order[k]]) > block_len:
            start, n = int(starts[order[k]]), int(lengths[order[k]])
            offsets = torch.arange(block_len)
            position_of_slot.append(start + offsets.clamp(max=n - 1))
            position_or_none.append(torch.where(offsets < n, start + offsets, flat.numel()))
            slot_of_position[start:start + n] = slot + torch.arange(n)
            slot += block_len
            count += 1
            k += 1
        blocks.append((count, block_len))
    device = position_ids.device
    return DocumentLayout(torch.cat(position_of_slot).to(device), slot_of_position.to(device),
                          torch.cat(position_or_none).to(device), blocks)


class _Regroup(torch.autograd.Function):
    """rows = x[index], whose gradient is grad[inverse] (an index one past the end reads zero).

    Correct because every row of x is read by exactly one slot whose gradient can be non-zero:
    padding slots feed only padding queries, whose outputs are never read. A gather then replaces
    autograd's accumulating scatter, which is several times slower on CPU."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        inverse, = ctx.saved_tensors
        grad = torch.cat([grad, grad.new_zeros((1, *grad.shape[1:]))])
        return grad.index_select(0, inverse), None, None


def sdpa_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          documents: DocumentLayout | None = None, **kwargs):
    """transformers' attention signature: query (batch, heads, width, head_dim), key and value
    (batch, kv_heads, width, head_dim); returns (batch, width, heads, head_dim) and no weights."""
    if documents is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    batch, heads, width, head_dim = query.shape

    def to_slots(t):  # (slots, heads, head_dim)
        flat = t.transpose(1, 2).reshape(batch * width, t.shape[1], head_dim)
        return _Regroup.apply(flat, documents.position_of_slot, documents.slot_of_position)

    q, k, v = to_slots(query), to_slots(key), to_slots(value)
    gqa = key.shape[1] != heads
    outputs, slot = [], 0
    for count, length in documents.blocks:
        size = count * length

        def block(t):
            return t[slot:slot + size].view(count, length, t.shape[1], head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(block(q), block(k), block(v), dropout_p=dropout, is_causal=True,
                                             scale=scaling, enable_gqa=gqa)
        outputs.append(out.transpose(1, 2).reshape(size, heads, head_dim))
        slot += size
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    out = _Regroup.apply(out, documents.slot_of_position, documents.position_or_none)
    return out.view(batch, width, heads, head_dim), None


def register_sdpa_varlen() -> None:
    """Make `sdpa_varlen` an attention implementation of transformers (registering again is
    harmless). Called before a model is built with it, not on import."""
    AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
    # The mask transformers builds for a packed batch is only used when no layout comes with it.
    ALL_MASK_ATTENTION_FUNCTIONS.register(SDPA_VARLEN, sdpa_mask)
