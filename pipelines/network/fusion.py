"""Symmetric UV space feature fusion (section 3.4, Fig. 3, eqs. 3-5).

At every scale i the global map F_g^i is patchified into query tokens on a G x G grid (G = ``token_grid``, capped
by the scale's resolution; the patch size grows with resolution: 1, 2, 4, 8 at the paper's settings). The local map
[F_l^i, M_v^i] is patchified the same way into key/value tokens. Each query attends to 2 w^2 local tokens:

* the w x w window centred at its own token position (row r, column c), and
* the w x w window centred at the *horizontally mirrored* position (r, G - 1 - c), the same face point on the other
  side of the symmetric UV layout. It is gathered as ``unfold(flip(x))`` evaluated at the query position (r, c):
  window slot (dr, dc) holds x[r + dr, (G - 1 - c) - dc], i.e. the mirrored window *with mirrored contents*, so a
  slot's offset means the same physical direction on both sides of the face and one learned relative-position bias
  table (per head, per window, per slot) is consistent. (Do not also flip the output positions: that would centre
  the "mirrored" window back at column c.)

Padded slots (windows crossing the grid border) are masked out. Projections are 1x1 convolutions, the feed-forward
is conv1x1 -> depthwise conv3x3 -> GELU -> conv1x1 ("convolution layers instead of linear layers"), LayerNorm is per
token, and every sub-layer is residual.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import LayerNorm2d
from .config import NetworkConfig


def gather_windows(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct and mirrored w x w windows of a token grid.

    Args:
        x: (B, C, Gh, Gw) token grid.
        window: odd w.

    Returns:
        direct (B, C, w*w, Gh*Gw): slot (dr, dc) (row-major, dr, dc in [-w//2, w//2]) of query (r, c) holds
            x[r + dr, c + dc];
        mirrored (B, C, w*w, Gh*Gw): x[r + dr, Gw - 1 - c - dc] (centred at the mirrored column, contents mirrored);
        in_bounds (1, 1, w*w, Gh*Gw) bool: False for slots outside the grid (zero padding), the same for both.
    """
    B, C, Gh, Gw = x.shape
    pad = window // 2
    direct = F.unfold(x, window, padding=pad).view(B, C, window * window, Gh * Gw)
    mirrored = F.unfold(x.flip(-1), window, padding=pad).view(B, C, window * window, Gh * Gw)
    ones = torch.ones(1, 1, Gh, Gw, dtype=x.dtype, device=x.device)
    in_bounds = F.unfold(ones, window, padding=pad).view(1, 1, window * window, Gh * Gw) > 0.5
    return direct, mirrored, in_bounds


class WindowCrossAttention(nn.Module):
    """Multi-head cross-attention of query tokens to their direct + mirrored local windows (2 w^2 keys each)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.window = heads, window
        self.to_q = nn.Conv2d(dim, dim, 1)
        self.to_k = nn.Conv2d(dim, dim, 1)
        self.to_v = nn.Conv2d(dim, dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        # Learned bias for each (window: direct / mirrored, slot) per head: tells the two windows apart and lets
        # the attention prefer the aligned centre while tolerating small misalignments.
        self.rel_bias = nn.Parameter(torch.zeros(heads, 2 * window * window))

    def forward(self, query: torch.Tensor, context: torch.Tensor, return_attention: bool = False,
                impl: str = "shift"):
        """query, context: (B, D, Gh, Gw) token grids -> (B, D, Gh, Gw) (and attention (B, heads, 2w^2, L)).

        ``impl="shift"`` (default) slides the windows with strided views and never materialises the 2 w^2 keys of
        every query (about 40x faster on CPU at the paper's sizes); ``impl="unfold"`` is the direct reference built
        on ``gather_windows``. Both give the same result, slot order (window, dr, dc).
        """
        B, D, Gh, Gw = query.shape
        h, n = self.heads, 2 * self.window**2
        d = D // h
        q = self.to_q(query).view(B, h, d, Gh, Gw)
        k, v = self.to_k(context), self.to_v(context)
        attend = self._attend_shift if impl == "shift" else self._attend_unfold
        out, attn = attend(q * d**-0.5, k, v)
        out = self.proj(out.reshape(B, D, Gh, Gw))
        return (out, attn) if return_attention else out

    def _softmax(self, logits: torch.Tensor, Gh: int, Gw: int) -> torch.Tensor:
        """logits (B, h, 2w^2, L) -> attention with the relative bias added and padded slots masked."""
        w = self.window
        ones = torch.ones(1, 1, Gh, Gw, dtype=logits.dtype, device=logits.device)
        in_bounds = F.unfold(ones, w, padding=w // 2).view(1, 1, w * w, Gh * Gw) > 0.5
        mask = torch.cat([in_bounds, in_bounds], dim=2)  # the centre slot is always in bounds
        logits = logits + self.rel_bias.view(1, self.heads, -1, 1)
        return logits.masked_fill(~mask, float("-inf")).softmax(dim=2)

    def _attend_unfold(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, h, d, Gh, Gw = q.shape
        n, L = 2 * self.window**2, Gh * Gw
        k_dir, k_mir, _ = gather_windows(k, self.window)
        v_dir, v_mir, _ = gather_windows(v, self.window)
        keys = torch.cat([k_dir, k_mir], dim=2).view(B, h, d, n, L)
        values = torch.cat([v_dir, v_mir], dim=2).view(B, h, d, n, L)
        logits = (q.view(B, h, d, 1, L) * keys).sum(2)
        attn = self._softmax(logits, Gh, Gw)
        return (attn[:, :, None] * values).sum(3), attn

    def _attend_shift(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, h, d, Gh, Gw = q.shape
        w, pad = self.window, self.window // 2

        def padded(x: torch.Tensor) -> torch.Tensor:  # (B, D, Gh, Gw) -> (B, h, d, Gh + 2p, Gw + 2p)
            return F.pad(x, (pad, pad, pad, pad)).view(B, h, d, Gh + 2 * pad, Gw + 2 * pad)

        def row_windows(x: torch.Tensor, dr: int) -> torch.Tensor:
            """(B, h, d, Gh, w, Gw): [..., r, j, c] = x_padded[r + dr, c + j], i.e. column offset j - p."""
            return x[..., dr : dr + Gh, :].unfold(4, Gw, 1)

        keys = (padded(k), padded(k.flip(-1)))  # direct, mirrored (flip: column c <-> Gw - 1 - c)
        values = (padded(v), padded(v.flip(-1)))
        qe = q[:, :, :, :, None]  # (B, h, d, Gh, 1, Gw)
        logits = torch.stack(
            [torch.stack([(qe * row_windows(kk, dr)).sum(2) for dr in range(w)], 2) for kk in keys], 2
        )  # (B, h, 2, w_dr, Gh, w_dc, Gw)
        logits = logits.permute(0, 1, 2, 3, 5, 4, 6).reshape(B, h, 2 * w * w, Gh * Gw)
        attn = self._softmax(logits, Gh, Gw)
        a = attn.view(B, h, 2, w, w, Gh, Gw).permute(0, 1, 2, 3, 5, 4, 6)  # (B, h, 2, dr, Gh, dc, Gw)
        out = q.new_zeros(B, h, d, Gh, Gw)
        for win, vv in enumerate(values):
            for dr in range(w):
                out = out + (a[:, :, win, dr, None] * row_windows(vv, dr)).sum(4)
        return out, attn


class FusionBlock(nn.Module):
    """Transformer block with convolutions: x += CrossAttn(LN(x), LN(ctx)); x += FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, window: int, ffn_ratio: int = 2) -> None:
        super().__init__()
        hidden = dim * ffn_ratio
        self.norm_q, self.norm_kv, self.norm_ffn = LayerNorm2d(dim), LayerNorm2d(dim), LayerNorm2d(dim)
        self.attn = WindowCrossAttention(dim, heads, window)
        self.ffn = nn.Sequential(
            nn.Conv2d(dim, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_kv(context))
        return x + self.ffn(self.norm_ffn(x))


def symmetric_fill(F_l: torch.Tensor, M_v: torch.Tensor, M_o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 3-4: F_lm = M_o * F_l; F_m = F_lm + flip(F_lm) * (1 - M_v * M_o), flip = horizontal flip in UV.

    F_l (B, C, H, W), M_v and M_o (B, 1, H, W) in [0, 1]. Returns (F_lm, F_m).
    """
    F_lm = M_o * F_l
    return F_lm, F_lm + F_lm.flip(-1) * (1.0 - M_v * M_o)


class ScaleFusion(nn.Module):
    """Symmetric fusion at one scale i: (F_g^i, F_l^i, M_v^i) -> F_c^i, and for i >= 2 also M_o, F_m^i, F_f^i."""

    def __init__(self, cfg: NetworkConfig, scale: int) -> None:
        super().__init__()
        self.scale = scale
        C, Cl, D = cfg.uv_channels[scale - 1], cfg.local_channels(scale), cfg.fusion_dim
        p, G = cfg.patch_size(scale), cfg.tokens_per_side(scale)
        self.embed_q = nn.Conv2d(C, D, p, stride=p)
        self.embed_kv = nn.Conv2d(Cl + 1, D, p, stride=p)  # + M_v^i: lets attention tell empty tokens apart
        self.pos = nn.Parameter(0.02 * torch.randn(1, D, G, G))
        self.blocks = nn.ModuleList(FusionBlock(D, cfg.fusion_heads, cfg.window, cfg.ffn_ratio)
                                    for _ in range(cfg.fusion_layers))
        self.norm_out = LayerNorm2d(D)
        self.unembed = nn.Sequential(nn.Conv2d(D, C * p * p, 1), nn.PixelShuffle(p))
        self.has_local_path = scale >= 2
        if self.has_local_path:
            self.occlusion = nn.Conv2d(C + Cl, 1, 3, padding=1)
            nn.init.constant_(self.occlusion.bias, 2.0)  # M_o ~ 0.88 at init: trust the projection at first
            self.merge = nn.Conv2d(C + Cl, C, 3, padding=1)

    def forward(self, F_g: torch.Tensor, F_l: torch.Tensor, M_v: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """F_g (B, C, K_i, K_i), F_l (B, C_l, K_i, K_i), M_v (B, 1, K_i, K_i) -> dict with F_c, F_f, M_o, F_lm, F_m."""
        q = self.embed_q(F_g) + self.pos
        kv = self.embed_kv(torch.cat([F_l, M_v], dim=1))
        for block in self.blocks:
            q = block(q, kv)
        # Residual to F_g^i at full resolution: patchification loses detail that the global map still has.
        F_c = F_g + self.unembed(self.norm_out(q))
        out: dict[str, torch.Tensor | None] = {"F_c": F_c, "F_f": None, "M_o": None, "F_lm": None, "F_m": None}
        if self.has_local_path:
            M_o = torch.sigmoid(self.occlusion(torch.cat([F_c, F_l], dim=1)))
            F_lm, F_m = symmetric_fill(F_l, M_v, M_o)
            out.update(M_o=M_o, F_lm=F_lm, F_m=F_m, F_f=self.merge(torch.cat([F_c, F_m], dim=1)))
        return out
