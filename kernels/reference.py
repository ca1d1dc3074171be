"""PyTorch references for every kernel: the semantics the Triton kernels must match,
and the CPU path of the engine (kernel_backend="torch"), so they are batched, not per token.

KV cache layout, one tensor per layer: [2, num_blocks, block_size, num_kv_heads, head_dim], K then V.
Slot of token t of a sequence: block_table[t // block_size] * block_size + t % block_size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter key/value [num_tokens, num_kv_heads, head_dim] into their slots; slot -1 is skipped (padding)."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def _gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_seqs, num_kv_heads, max_seq_len, head_dim] views of K and V gathered from the sequences' blocks.
    index_select over a flat block list: several times faster on CPU than advanced indexing with the table."""
    num_seqs, block_size = block_tables.shape[0], kv_cache.shape[2]
    num_blocks = (max_seq_len + block_size - 1) // block_size
    table = block_tables[:, :num_blocks].reshape(-1).long()
    kv = kv_cache.index_select(1, table).view(2, num_seqs, num_blocks * block_size, *kv_cache.shape[-2:])
    kv = kv[:, :, :max_seq_len].transpose(2, 3)
    return kv[0], kv[1]


def _key_mask(q_pos: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean [num_seqs, q_len, max_seq_len]: key j is visible to the query at position q_pos."""
    k_pos = torch.arange(max_seq_len, device=q_pos.device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    return mask


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scale: float,
          logits_soft_cap: float | None) -> torch.Tensor:
    """query [B, H, q, d], key/value [B, kvh, k, d], mask [B, q, k]. The query heads sharing a KV head are
    folded into the query length, so K/V are read once per KV head instead of being repeated. With a soft cap
    (Gemma 2) the scores are cap * tanh(scores / cap) before the mask and the softmax, which SDPA cannot do."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    folded = query.reshape(batch, num_kv_heads, group * q_len, head_dim)
    mask = mask[:, None, None].expand(batch, 1, group, q_len, mask.shape[-1]).reshape(batch, 1, group * q_len, -1)
    if logits_soft_cap is None:
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
    else:
        scores = torch.tanh(folded @ key.transpose(-1, -2) * (scale / logits_soft_cap)) * logits_soft_cap
        weights = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=-1)
        out = weights.to(value.dtype) @ value
    return out.reshape(batch, num_heads, q_len, head_dim)


def paged_decode_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, first_seq: int, end_seq: int, scale: float, max_seq_len: int,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None, *,
                           out: torch.Tensor) -> None:
    """Sequences first_seq .. end_seq - 1 of the batch, one query token each (sequence i's is query row i, as
    decodes come first), attend to their seq_len cached tokens; writes their rows of out. query and out
    [num_tokens, num_heads, head_dim].
    A sliding window shows each query its last sliding_window keys (itself included); logits_soft_cap caps the
    scaled scores at +-cap with tanh."""
    seqs = slice(first_seq, end_seq)
    key, value = _gather_kv(kv_cache, block_tables[seqs], max_seq_len)
    lens = seq_lens[seqs].long()
    mask = _key_mask((lens - 1)[:, None], lens, max_seq_len, sliding_window)
    out[seqs] = _sdpa(query[seqs][:, :, None].to(key.dtype), key, value, mask, scale, logits_soft_cap)[:, :, 0]


def prefill_attention(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, first_seq: int, end_seq: int,
                      scale: float, max_seq_len: int, sliding_window: int | None = None,
                      logits_soft_cap: float | None = None, *, out: torch.Tensor) -> None:
    """Variable-length query chunks of sequences first_seq .. end_seq - 1 of the batch; writes their rows of out.
    Sequence i owns query rows query_start_loc[i]:query_start_loc[i+1], which are its last tokens (positions
    seq_len - q_len .. seq_len - 1), causal within the chunk and attending to the whole cached prefix. Their K/V
    are already in the cache. query and out [num_tokens, num_heads, head_dim]; the window and cap as in
    paged_decode_attention."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i in range(first_seq, end_seq):  # per sequence, not per token: prefills are few per step
        start, end, seq_len = starts[i], starts[i + 1], lens[i]
        key, value = _gather_kv(kv_cache, block_tables[i:i + 1], seq_len)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=query.device)[None]
        mask = _key_mask(q_pos, seq_lens[i:i + 1].long(), seq_len, sliding_window)
        q = query[start:end].transpose(0, 1)[None].to(key.dtype)
        out[start:end] = _sdpa(q, key, value, mask, scale, logits_soft_cap)[0].transpose(0, 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             weight_offset: float = 0.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm in fp32 over the last dim. With a residual: returns (norm(x + residual), x + residual).
    Llama rounds the normalised x to x's dtype before multiplying by weight; with a weight_offset (Gemma's
    1 + weight) the product is taken in fp32 and rounded once, as Gemma's norm does."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        out = (normed * (weight.float() + weight_offset)).to(x.dtype)
    else:
        out = normed.to(x.dtype) * weight
    return out if residual is None else (out, residual)


def _rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                      cos_sin_cache: torch.Tensor, is_neox: bool = True) -> None:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] in place.
    cos_sin_cache [max_position, rotary_dim]: cos in the first half, sin in the second; rotary_dim may be < head_dim.
    neox rotates (x[:half], x[half:]) pairs; GPT-J rotates interleaved (x[0::2], x[1::2]) pairs."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [num_tokens, rotary_dim // 2]
    for x in (query, key):
        rot = x[..., :cos.shape[-1] * 2]
        r = rot.float()
        if is_neox:
            x1, x2 = r.chunk(2, dim=-1)
        else:
            x1, x2 = r[..., 0::2], r[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        o1, o2 = x1 * c - x2 * s, x2 * c + x1 * s
        rot.copy_(torch.cat((o1, o2), -1) if is_neox else torch.stack((o1, o2), -1).flatten(-2))


def rotary_embedding_and_write_kv(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, cos_sin_cache: torch.Tensor, kv_cache: torch.Tensor,
                                  slot_mapping: torch.Tensor, is_neox: bool = True,
                                  q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                                  norm_eps: float = 1e-6, norm_weight_offset: float = 0.0) -> None:
    """A layer's new tokens into the cache: rotate query in place (_rotary_embedding) and write the rotated key and
    value into their slots (_write_kv_cache); key itself is left as it is. With norm weights (Qwen3, Gemma 3),
    every head of query and key goes through rms_norm first (query in place)."""
    if q_norm_weight is not None:
        query.copy_(rms_norm(query, q_norm_weight, norm_eps, None, norm_weight_offset))
        key = rms_norm(key, k_norm_weight, norm_eps, None, norm_weight_offset)
    else:
        key = key.clone()
    _rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    _write_kv_cache(key, value, kv_cache, slot_mapping)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): a linear layer's product, as torch computes it (on a GPU, cuBLAS)."""
    return F.linear(x, weight, bias)


def tune_linear(layers: list[tuple[torch.Tensor, torch.Tensor | None]]) -> list[dict]:
    """Choose, per (weight, bias) of the dense layers, what `linear` runs at decode batches (the Triton backend's
    times kernels/gemv.py against cuBLAS); torch's linear has no choice to make. Returns what was measured, for the
    log: nothing."""
    return []


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """A loaded linear weight in the layout this backend's `linear` reads: torch's own [N, K], as it is."""
    return weight


def embedding(input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The rows of weight [vocab, hidden] (as pack_linear_weight left it: a tied LM head's) for input_ids."""
    return F.embedding(input_ids, weight)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] holding gate then up: silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] holding gate then up: gelu(gate, approximate="tanh") * up (Gemma's GeGLU)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """Each token's output: the sum over its k experts e = topk_ids[t, k] of topk_weights[t, k] *
    w2[e] @ silu_and_mul(w13[e] @ x_t). hidden_states [T, H]; w13 [E, 2I, H] (gate rows, then up rows);
    w2 [E, H, I]; topk_weights [T, k] (fp32); topk_ids [T, k]. Returns [T, H] in hidden_states' dtype.
    The (token, k) pairs are sorted by expert and each expert with tokens runs once on all of its own: a loop
    over experts, not tokens."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    rows = hidden_states[order // top_k]
    out = torch.empty(rows.shape[0], w2.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    start = 0
    for expert, count in enumerate(torch.bincount(flat, minlength=w13.shape[0]).tolist()):
        if count:
            end = start + count
            out[start:end] = silu_and_mul(rows[start:end] @ w13[expert].T) @ w2[expert].T
            start = end
    weighted = torch.empty_like(out)
    weighted[order] = (out.float() * topk_weights.flatten()[order, None]).to(out.dtype)
    return weighted.view(num_tokens, top_k, -1).sum(dim=1)
