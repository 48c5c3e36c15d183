"""DINORANKCLIP injection modules (docs/methods.md#image-injection): multi-scale fusion of frozen-teacher patch
maps with the student's local tokens (channel attention → spatial attention → self-attention
refiner), and the conflict-aware residual gate that injects the fused teacher feature into
the student's global embedding (image branch) or a projected text-teacher embedding into the
student's text embedding (text branch).

Pure `nn.Module`s: constructor arguments are plain ints/floats/bools, no config import.

    img = ImageInjection(teacher_dim=768, student_width=96, embed_dim=64, num_scales=4, grid=4)
    f = img(f_s, teacher.multiscale, student_tokens)      # [B, 64]; == f_s exactly at init
    txt = TextInjection(teacher_dim=384, embed_dim=64)
    t = txt(t_s, text_teacher_emb)                         # [B, 64]; == t_s exactly at init

Identity at initialization (exact, not approximate). Every gate carries a zero-initialized
per-channel output scale `alpha` (ReZero-style), `f = f_s + alpha ⊙ g ⊙ P(f_t)`:

* forward: `alpha ⊙ (…) = 0` so `f == f_s` bit for bit;
* backward: every gradient that leaves the injection branch toward the student (through
  `f_s` inside the gate MLP / cosine, or through the student local tokens feeding the fusion)
  is multiplied by `alpha = 0`, so it is an exact zero and the student's parameter gradients
  are *identical* to those of the student trained alone (same InfoNCE loss, same gradients);
* `alpha` itself gets `∂L/∂alpha = Σ_b ∂L/∂f ⊙ g ⊙ P(f_t)`, non-zero as soon as some sample
  has `cos(f_s, P(f_t)) > 0`, so the first optimizer step opens the branch; the gate MLP,
  projector, refiner, … receive gradient from the step after.

The brief's "last layer zero weights with a negative bias" alone only gives `f ≈ f_s`
(`g = σ(b)·cos ≈ 0.018·cos` for b = −4) and perturbs both the output and the student's
gradients at init; `alpha` makes the identity exact while keeping that gate init (so when the
branch opens, it opens through a small, teacher/student-agreement-weighted gate).
`alpha` is a 1-D parameter: put it in the no-weight-decay group with biases and norms.

Teacher inputs are **detached** inside the modules (`.detach()`): the teachers are frozen and
their outputs are computed under `no_grad` or read from the cache anyway, and detaching makes
that explicit (a teacher tensor passed with `requires_grad=True` receives no gradient).
Student inputs (`f_s`, student local tokens) are *not* detached: once `alpha ≠ 0` the student
learns through the fusion too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from raytrain.models.init import part_init


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _positive(**kw: int) -> None:
    for name, v in kw.items():
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive int, got {v!r}")


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    _check(side * side == n, f"{what}: {n} tokens do not form a square grid")
    return side


def _default_heads(dim: int) -> int:
    return next(h for h in (8, 6, 4, 3, 2, 1) if dim % h == 0)


class ChannelAttention(nn.Module):
    """CBAM channel attention over tokens `F` [B, N, C] (pooling over the N tokens):

        a = σ( MLP(avgpool_N F) + MLP(maxpool_N F) ) ∈ (0, 1)^C,   out = F ⊙ a  (broadcast over N)

    with one shared `MLP = Linear(C, C/r) → ReLU → Linear(C/r, C)` (hidden ≥ 1).
    """

    def __init__(self, dim: int, reduction: int = 4):
        super().__init__()
        _positive(dim=dim, reduction=reduction)
        self.dim = dim
        hidden = max(1, dim // reduction)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def weights(self, x: Tensor) -> Tensor:
        """The channel weights `a` [B, C]."""
        _check(
            x.dim() == 3 and x.shape[-1] == self.dim,
            f"ChannelAttention expects [B, N, {self.dim}], got {tuple(x.shape)}",
        )
        return torch.sigmoid(self.mlp(x.mean(1)) + self.mlp(x.amax(1)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x).unsqueeze(1)


class SpatialAttention(nn.Module):
    """CBAM spatial attention on the token grid: tokens `F` [B, h·w, C] (row-major) are viewed
    as [B, C, h, w] and

        m = σ( conv_k×k([mean_C F ; max_C F]) ) ∈ (0, 1)^{h×w},   out = F ⊙ m  (broadcast over C)

    with `conv` a 2→1 channel k×k convolution (zero "same" padding, bias).
    """

    def __init__(self, kernel: int = 7):
        super().__init__()
        _positive(kernel=kernel)
        _check(kernel % 2 == 1, f"SpatialAttention kernel must be odd, got {kernel}")
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def weights(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """The spatial map `m` [B, N] for tokens `x` [B, N, C] on a `grid` = (h, w) (square if None)."""
        _check(x.dim() == 3, f"SpatialAttention expects tokens [B, N, C], got {tuple(x.shape)}")
        b, n, _ = x.shape
        if grid is None:
            side = _square_side(n, "SpatialAttention")
            grid = (side, side)
        h, w = grid
        _check(h * w == n, f"SpatialAttention: grid {h}x{w} does not match {n} tokens")
        pooled = torch.stack([x.mean(-1), x.amax(-1)], 1).view(b, 2, h, w)  # [B, 2, h, w]
        return torch.sigmoid(self.conv(pooled)).view(b, n)

    def forward(self, x: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return x * self.weights(x, grid).unsqueeze(-1)


class Refiner(nn.Module):
    """Self-attention refiner: `depth` pre-LN transformer layers over the tokens, a final
    LayerNorm, then attention pooling with one learned query `q`:

        z = LN(Block_depth(… Block_1(X + pos)))          X [B, N, dim]
        out = MHA(q, z, z)                                → [B, dim]

    `pos` is a learned position embedding [1, num_tokens, dim] (only if `num_tokens` is given;
    otherwise the refiner is permutation-invariant). Blocks: `x + MHA(LN x)`, `x + MLP(LN x)`,
    MLP ratio 4, GELU, no dropout.
    """

    def __init__(self, dim: int, depth: int = 1, heads: int | None = None, num_tokens: int | None = None):
        super().__init__()
        heads = _default_heads(dim) if heads is None else heads
        _positive(dim=dim, depth=depth, heads=heads)
        _check(dim % heads == 0, f"Refiner dim {dim} is not divisible by heads {heads}")
        self.dim = dim
        self.num_tokens = num_tokens
        self.pos = None
        if num_tokens is not None:
            _positive(num_tokens=num_tokens)
            self.pos = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        _check(x.dim() == 3 and x.shape[-1] == self.dim, f"Refiner expects [B, N, {self.dim}], got {tuple(x.shape)}")
        if self.pos is not None:
            _check(x.shape[1] == self.num_tokens, f"Refiner built for {self.num_tokens} tokens, got {x.shape[1]}")
            x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        out, _ = self.pool(self.query.expand(x.shape[0], -1, -1), x, x, need_weights=False)
        return out.squeeze(1)


class MultiScaleFusion(nn.Module):
    """Image-branch fusion of teacher multi-scale patch maps with the student's local tokens.

    Inputs: teacher `T` [B, L, g·g, D] (L scales, g×g grid, from `TeacherOutput.multiscale`)
    and student tokens `S` [B, P, W] (P = s·s patch tokens of width W, `ImageTower` output).

        X_l = Linear_l(T_l)                  per-scale projection D → W,     l = 1..L
        X_s = AdaptiveAvgPool_{g×g}(S)       student grid s×s → g×g
        F   = Σ_k softmax(w)_k X_k           learned merge over the L scales + student
        F   = SpatialAttn(ChannelAttn(F))    each switchable (off = identity)
        h   = Refiner(F)                     (off = mean over the g·g tokens)     [B, W]
        f_t = P(h)                           Linear W → embed_dim                  [B, E]

    The merge logits `w` start at zero (uniform average). `student_tokens=None` merges the L
    teacher scales only (softmax over their logits). The teacher input is detached.
    """

    def __init__(
        self,
        teacher_dim: int,
        student_width: int,
        embed_dim: int,
        num_scales: int,
        grid: int,
        use_channel: bool = True,
        use_spatial: bool = True,
        use_refiner: bool = True,
        reduction: int = 4,
        kernel: int = 7,
        refiner_depth: int = 1,
        heads: int | None = None,
    ):
        super().__init__()
        _positive(
            teacher_dim=teacher_dim, student_width=student_width, embed_dim=embed_dim, num_scales=num_scales, grid=grid
        )
        self.teacher_dim, self.width, self.embed_dim = teacher_dim, student_width, embed_dim
        self.num_scales, self.grid = num_scales, grid
        self.use_channel, self.use_spatial, self.use_refiner = use_channel, use_spatial, use_refiner
        with part_init("scale_proj"):
            self.scale_proj = nn.ModuleList(nn.Linear(teacher_dim, student_width) for _ in range(num_scales))
        self.merge_logits = nn.Parameter(torch.zeros(num_scales + 1))  # L teacher scales, then the student
        with part_init("channel"):
            self.channel = ChannelAttention(student_width, reduction) if use_channel else nn.Identity()
        with part_init("spatial"):
            self.spatial = SpatialAttention(kernel) if use_spatial else None
        with part_init("refiner"):
            self.refiner = Refiner(student_width, refiner_depth, heads, num_tokens=grid * grid) if use_refiner else None
        with part_init("proj"):
            self.proj = nn.Linear(student_width, embed_dim)  # P

    def check_inputs(self, multiscale: Tensor, student_tokens: Tensor | None) -> None:
        g2, d = self.grid * self.grid, self.teacher_dim
        _check(
            multiscale.dim() == 4 and multiscale.shape[1:] == (self.num_scales, g2, d),
            f"teacher multiscale must be [B, {self.num_scales}, {g2}, {d}] (L, grid*grid, D), "
            f"got {tuple(multiscale.shape)}",
        )
        if student_tokens is not None:
            _check(
                student_tokens.dim() == 3 and student_tokens.shape[-1] == self.width,
                f"student tokens must be [B, P, {self.width}], got {tuple(student_tokens.shape)}",
            )
            _check(
                student_tokens.shape[0] == multiscale.shape[0],
                f"batch mismatch: teacher {multiscale.shape[0]} vs student tokens {student_tokens.shape[0]}",
            )
            _square_side(student_tokens.shape[1], "student tokens")

    def resize_student(self, tokens: Tensor) -> Tensor:
        """Student tokens [B, s·s, W] (row-major grid) → [B, g·g, W] by adaptive average pooling."""
        b, p, w = tokens.shape
        side = _square_side(p, "student tokens")
        grid = tokens.transpose(1, 2).reshape(b, w, side, side)
        return F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)

    def merge_weights(self, with_student: bool = True) -> Tensor:
        """softmax of the merge logits: [L + 1] (teacher scales, then student) or [L]."""
        return torch.softmax(self.merge_logits if with_student else self.merge_logits[:-1], 0)

    def tokens(self, multiscale: Tensor, student_tokens: Tensor | None = None) -> Tensor:
        """The fused, attended token map [B, g·g, W] (before the refiner / pooling)."""
        self.check_inputs(multiscale, student_tokens)
        dtype = self.scale_proj[0].weight.dtype
        teacher = multiscale.detach().to(dtype)
        maps = [proj(teacher[:, i]) for i, proj in enumerate(self.scale_proj)]
        if student_tokens is not None:
            maps.append(self.resize_student(student_tokens))
        weights = self.merge_weights(student_tokens is not None).to(maps[0].dtype)
        x = torch.einsum("k,kbnc->bnc", weights, torch.stack(maps, 0))
        x = self.channel(x)
        if self.spatial is not None:
            x = self.spatial(x, (self.grid, self.grid))
        return x

    def forward(self, multiscale: Tensor, student_tokens: Tensor | None = None) -> Tensor:
        """→ `f_t` [B, embed_dim]."""
        x = self.tokens(multiscale, student_tokens)
        pooled = self.refiner(x) if self.refiner is not None else x.mean(1)
        return self.proj(pooled)


class ConflictGate(nn.Module):
    """Conflict-aware residual gate (docs/methods.md#conflict-aware-gate) with an exact-identity init:

        p = P(f_t)                                               P = Linear(dim, dim) or identity
        g = σ( MLP([f_s ; p ; f_s ⊙ p]) ) · clamp(cos(f_s, p), 0, 1)      per sample & channel
        f = f_s + alpha ⊙ g ⊙ p                                  (use_gate=False: f = f_s + alpha ⊙ p)

    `MLP = Linear(3·dim, hidden) → GELU → Linear(hidden, dim)`; its last layer has zero weights
    and bias `gate_bias` (−4: σ = 0.018), so the gate starts small and uniform; the cosine factor
    closes it (exactly 0) wherever the teacher feature is orthogonal or anti-aligned to the
    student's ("conflict"). `alpha` [dim] is a ReZero scale initialized to `alpha_init` = 0, which
    makes `f == f_s` exactly at init and the student's gradients exactly those of the student
    alone, while `alpha` itself receives gradient so the branch can open (see the module doc).

    `project=False` when `f_t` is already the projected teacher feature (the compositions below
    use the fusion's output projection / the text projector as P).
    """

    def __init__(
        self,
        dim: int,
        hidden: int | None = None,
        use_gate: bool = True,
        project: bool = True,
        gate_bias: float = -4.0,
        alpha_init: float = 0.0,
    ):
        super().__init__()
        hidden = dim if hidden is None else hidden
        _positive(dim=dim, hidden=hidden)
        self.dim, self.use_gate = dim, use_gate
        self.proj = nn.Linear(dim, dim) if project else nn.Identity()
        self.alpha = nn.Parameter(torch.full((dim,), float(alpha_init)))
        self.mlp = None
        if use_gate:
            self.mlp = nn.Sequential(nn.Linear(3 * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.constant_(self.mlp[-1].bias, float(gate_bias))

    def _check_pair(self, f_s: Tensor, f_t: Tensor) -> None:
        _check(f_s.dim() == 2 and f_s.shape[-1] == self.dim, f"f_s must be [B, {self.dim}], got {tuple(f_s.shape)}")
        _check(f_t.dim() == 2 and f_t.shape[-1] == self.dim, f"f_t must be [B, {self.dim}], got {tuple(f_t.shape)}")
        _check(f_s.shape[0] == f_t.shape[0], f"batch mismatch: f_s {f_s.shape[0]} vs f_t {f_t.shape[0]}")

    def gate(self, f_s: Tensor, p: Tensor) -> Tensor:
        """g [B, dim] for the student feature `f_s` and the projected teacher feature `p`
        (all ones if use_gate=False)."""
        if self.mlp is None:
            return torch.ones_like(p)
        agree = F.cosine_similarity(f_s, p, dim=-1, eps=1e-8).clamp(0, 1).unsqueeze(-1)
        return torch.sigmoid(self.mlp(torch.cat([f_s, p, f_s * p], -1))) * agree

    def forward(self, f_s: Tensor, f_t: Tensor, return_gate: bool = False):
        """f_s [B, dim], f_t [B, dim] → f [B, dim] (and g [B, dim] if return_gate)."""
        self._check_pair(f_s, f_t)
        p = self.proj(f_t.to(f_s.dtype))
        g = self.gate(f_s, p)
        f = f_s + self.alpha * g * p
        return (f, g) if return_gate else f


class ImageInjection(nn.Module):
    """Image branch: `f = ConflictGate(f_s, MultiScaleFusion(T, S))`.

    f_t = MultiScaleFusion(T [B, L, g·g, D], S [B, P, W])    [B, E]  (its output Linear is P)
    f   = f_s + alpha ⊙ g ⊙ f_t                               [B, E]  (== f_s at init)
    """

    def __init__(
        self,
        teacher_dim: int,
        student_width: int,
        embed_dim: int,
        num_scales: int,
        grid: int,
        use_channel: bool = True,
        use_spatial: bool = True,
        use_refiner: bool = True,
        use_gate: bool = True,
        gate_hidden: int | None = None,
        gate_bias: float = -4.0,
        reduction: int = 4,
        kernel: int = 7,
        refiner_depth: int = 1,
        heads: int | None = None,
    ):
        super().__init__()
        with part_init("fusion"):
            self.fusion = MultiScaleFusion(
                teacher_dim,
                student_width,
                embed_dim,
                num_scales,
                grid,
                use_channel,
                use_spatial,
                use_refiner,
                reduction,
                kernel,
                refiner_depth,
                heads,
            )
        with part_init("gate"):
            self.gate = ConflictGate(embed_dim, gate_hidden, use_gate, project=False, gate_bias=gate_bias)

    def teacher_feature(self, multiscale: Tensor, student_tokens: Tensor | None = None) -> Tensor:
        """f_t = P(fused) [B, E]."""
        return self.fusion(multiscale, student_tokens)

    def forward(self, f_s: Tensor, multiscale: Tensor, student_tokens: Tensor | None = None, return_gate: bool = False):
        """(f_s [B, E], teacher multiscale [B, L, g·g, D], student tokens [B, P, W]) → f [B, E]."""
        return self.gate(f_s, self.teacher_feature(multiscale, student_tokens), return_gate=return_gate)


class TextInjection(nn.Module):
    """Text branch: a frozen text-teacher embedding through a learned projector, gated into
    the student's text embedding:

        p = Linear(LN(e_t))           e_t [B, Dt] (detached) → [B, E]   (the "text-aligned projection", P)
        t = ConflictGate(t_s, p)      t_s + alpha ⊙ g ⊙ p               (== t_s at init)
    """

    def __init__(
        self,
        teacher_dim: int,
        embed_dim: int,
        use_gate: bool = True,
        gate_hidden: int | None = None,
        gate_bias: float = -4.0,
    ):
        super().__init__()
        _positive(teacher_dim=teacher_dim, embed_dim=embed_dim)
        self.teacher_dim, self.embed_dim = teacher_dim, embed_dim
        self.projector = nn.Sequential(nn.LayerNorm(teacher_dim), nn.Linear(teacher_dim, embed_dim))
        self.gate = ConflictGate(embed_dim, gate_hidden, use_gate, project=False, gate_bias=gate_bias)

    def teacher_feature(self, teacher_emb: Tensor) -> Tensor:
        _check(
            teacher_emb.dim() == 2 and teacher_emb.shape[-1] == self.teacher_dim,
            f"text-teacher embedding must be [B, {self.teacher_dim}], got {tuple(teacher_emb.shape)}",
        )
        return self.projector(teacher_emb.detach().to(self.projector[1].weight.dtype))

    def forward(self, t_s: Tensor, teacher_emb: Tensor, return_gate: bool = False):
        """(t_s [B, E], text-teacher embedding [B, Dt]) → t [B, E]."""
        return self.gate(t_s, self.teacher_feature(teacher_emb), return_gate=return_gate)
