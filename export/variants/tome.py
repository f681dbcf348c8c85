"""Token merging for Stable Diffusion (ToMe-SD, Bolya & Hoffman 2023) on a diffusers UNet: before each
self-attention at the UNet's highest resolution, a fraction of the image tokens is merged into similar
ones, attention runs on fewer tokens, and the merged tokens take their partner's output afterwards.

Matching is bipartite, as in ToMe-SD: one token of each 2x2 window is a destination (the window's
top-left: no random choice, so an image is the same in every batch), every other token is a source
that may merge into its most similar destination (cosine similarity of the normed hidden states); the
``ratio`` of all tokens with the most similar partners merge (averaged into it). Each image row is
matched on its own. Cross-attention and the feed-forward layers run on every token (ToMe-SD's default).

Attention cost grows with the square of the tokens, so the saving grows with the resolution: a loss on
16x16 latents; on a CPU, where convolutions dominate, 1.07x at SD 1.5's 64x64 (benchmarks/scale_curve.py).
"""
from __future__ import annotations

import torch


def merge_plan(x: torch.Tensor, h: int, w: int, ratio: float):
    """(merge, unmerge) for tokens ``x`` [B, h*w, C] laid out row-major on an h x w grid."""
    b, n, c = x.shape
    grid = torch.arange(n, device=x.device).view(h, w)
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=x.device)
    is_dst[::2, ::2] = True
    dst_idx, src_idx = grid[is_dst], grid[~is_dst]
    r = min(int(n * ratio), src_idx.numel())
    if r <= 0:
        return (lambda t: t), (lambda t: t)
    with torch.no_grad():
        metric = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)  # B, n_src, n_dst
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
    merged, kept = order[:, :r], order[:, r:]  # positions in the source list
    into = partner.gather(1, merged)  # the destination each merged source joins

    def take(t, idx):
        return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[:, src_idx], t[:, dst_idx]
        ch = t.shape[-1]
        total = dst.scatter_add(1, into.unsqueeze(-1).expand(-1, -1, ch), take(src, merged))
        count = torch.ones(b, dst.shape[1], 1, dtype=t.dtype, device=t.device).scatter_add(
            1, into.unsqueeze(-1), torch.ones(b, r, 1, dtype=t.dtype, device=t.device))
        return torch.cat([take(src, kept), total / count], dim=1)

    def unmerge(t: torch.Tensor) -> torch.Tensor:
        ch = t.shape[-1]
        n_kept = kept.shape[1]
        kept_out, dst_out = t[:, :n_kept], t[:, n_kept:]
        src_out = t.new_empty(b, src_idx.numel(), ch)
        src_out.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, ch), kept_out)
        src_out.scatter_(1, merged.unsqueeze(-1).expand(-1, -1, ch), take(dst_out, into))
        out = t.new_empty(b, n, ch)
        out[:, dst_idx] = dst_out
        out[:, src_idx] = src_out
        return out

    return merge, unmerge


class _MergingProcessor:
    """Wraps a self-attention's processor: merge, attend, unmerge (only at the top resolution)."""

    def __init__(self, inner, state: dict, ratio: float):
        self.inner, self.state, self.ratio = inner, state, ratio

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        h, w = self.state.get("hw", (0, 0))
        if (encoder_hidden_states is not None or hidden_states.ndim != 3 or hidden_states.shape[1] != h * w
                or attention_mask is not None):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        merge, unmerge = merge_plan(hidden_states, h, w, self.ratio)
        return unmerge(self.inner(attn, merge(hidden_states), None, None, temb, **kwargs))


def apply_token_merging(unet, ratio: float) -> int:
    """Installs token merging at ``ratio`` (0 < ratio < 1; 0.5 merges half the tokens) on ``unet``'s
    self-attentions; returns how many it wrapped. The latent size of each call is read by a pre-hook."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"token merging ratio {ratio} must be between 0 and 1")
    state: dict = {}

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        state["hw"] = tuple(sample.shape[-2:])
    unet.register_forward_pre_hook(record, with_kwargs=True)
    wrapped = 0
    for name, module in unet.named_modules():
        if name.endswith("attn1") and hasattr(module, "set_processor"):
            module.set_processor(_MergingProcessor(module.processor, state, ratio))
            wrapped += 1
    return wrapped
