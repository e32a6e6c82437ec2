"""Edge-aligned frames and their Wigner-D matrices, for all edges at once.

For every edge a rotation R with R @ r_hat = y (e3nn's pole), and D^l(R) for l <= lmax,
so node features can be rotated into the frame where the SO(3) convolution becomes an
SO(2) one.

Frame. No smooth choice of R exists for every direction (hairy ball), but the model
does not need one: everything done in the frame commutes with rotations about the
edge, so outputs depend on the edge direction only, not on the frame's roll. What
matters is that R and its derivatives are finite everywhere, or autograd makes NaN
(0 * inf) for conservative forces. R is the shortest-arc rotation taking r_hat to
+y when r_hat . y >= 0, and to -y followed by a half turn about z otherwise; its only
division is by 1 + |r_hat . y| >= 1, so edges parallel or antiparallel to y are as
regular as any other.

Wigner-D. D^l is a polynomial in the entries of R: e3nn's spherical harmonics satisfy
Y^l(R x) = D^l(R) Y^l(x). Evaluating them at K fixed points x_k and at R x_k gives
D^l(R)^T = pinv(Y^l(X)) @ Y^l(X R^T), exact for any orthogonal R and cheap (one small
matmul per edge), smooth, and with no Euler angles to become singular.
"""
from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn


def edge_frames(unit_vectors: torch.Tensor) -> torch.Tensor:
    """[E, 3] unit edge directions -> [E, 3, 3] rotations R with R @ u = (0, 1, 0)."""
    cos_to_y = unit_vectors[:, 1]
    side = torch.where(cos_to_y >= 0, 1.0, -1.0).to(unit_vectors.dtype)  # which pole we rotate to
    # v = u x (side * y); shortest arc: R = I + [v]x + [v]x^2 / (1 + u . (side * y))
    x, z = unit_vectors[:, 0], unit_vectors[:, 2]
    vx, vy, vz = -side * z, torch.zeros_like(x), side * x
    zero = torch.zeros_like(x)
    cross = torch.stack([
        torch.stack([zero, -vz, vy], -1),
        torch.stack([vz, zero, -vx], -1),
        torch.stack([-vy, vx, zero], -1),
    ], -2)
    eye = torch.eye(3, dtype=unit_vectors.dtype, device=unit_vectors.device)
    # side * cos, not |cos|: at cos = 0 the derivative must be that of the chosen chart
    # (|cos| has derivative 0 there, which is no frame's derivative and breaks forces).
    scale = (1.0 / (1.0 + side * cos_to_y)).view(-1, 1, 1)
    to_pole = eye + cross + (cross @ cross) * scale
    # A half turn about z takes -y to +y: negate the x and y rows where side < 0.
    flip = torch.stack([side, side, torch.ones_like(side)], -1).unsqueeze(-1)
    return flip * to_pole


class WignerD(nn.Module):
    """Rotation matrices [E, 3, 3] -> block-diagonal D(R) [E, (lmax+1)^2, (lmax+1)^2] in e3nn order."""

    def __init__(self, lmax: int) -> None:
        super().__init__()
        self.lmax = lmax
        size = (lmax + 1) ** 2
        points = _fibonacci_sphere(size)
        harmonics = self._harmonics(points)  # [K, size]
        blocks = [
            torch.linalg.pinv(harmonics[:, l * l:(l + 1) ** 2]) for l in range(lmax + 1)
        ]  # pinv(Y^l(X)): [2l+1, K]
        mask = torch.block_diag(*[torch.ones(2 * l + 1, 2 * l + 1) for l in range(lmax + 1)])
        # Constants of the construction, kept in float64 (cast at use) and out of checkpoints.
        self.register_buffer("points", points, persistent=False)
        self.register_buffer("inverse_harmonics", torch.cat(blocks, 0), persistent=False)  # [size, K]
        self.register_buffer("block_mask", mask.double(), persistent=False)

    def _harmonics(self, points: torch.Tensor) -> torch.Tensor:
        return o3.spherical_harmonics(list(range(self.lmax + 1)), points, normalize=False)

    def forward(self, rotations: torch.Tensor) -> torch.Tensor:
        dtype = rotations.dtype
        rotated = torch.einsum("kj,eij->eki", self.points.to(dtype), rotations)  # R x_k: [E, K, 3]
        harmonics = self._harmonics(rotated)  # [E, K, size]
        # pinv(Y^l(X)) @ Y^l(R X) is D^l(R)^T on the diagonal blocks; the mask drops the
        # off-diagonal products, which mix degrees and mean nothing.
        transposed = torch.matmul(self.inverse_harmonics.to(dtype), harmonics) * self.block_mask.to(dtype)
        return transposed.transpose(1, 2)


class EdgeRotation:
    """Per edge, the maps node coefficients <-> edge-frame `orders`.

    Built once per forward pass and shared by all layers. The envelope multiplies every
    message exactly once, when it is rotated back, so it is folded into `to_node`. One
    bmm per gathered tensor each way (not one per order): these products are memory-bound,
    and one pass over the gathered node features is the cheapest.
    """

    def __init__(self, wigner: torch.Tensor, rows: torch.Tensor, order_sizes: list[int],
                 envelope: torch.Tensor | None) -> None:
        """wigner [E, n, n] (block-diagonal D(R)); rows: the node index of each edge-frame
        coefficient, orders concatenated; order_sizes: coefficients per order; envelope [E]
        (None: messages are not enveloped)."""
        self.order_sizes = order_sizes
        self.to_edge = wigner.index_select(1, rows)  # [E, edge_coefficients, n]
        to_node = self.to_edge if envelope is None else self.to_edge * envelope.view(-1, 1, 1)
        self.to_node = to_node.transpose(1, 2).contiguous()

    def rotate_to_edges(self, *parts: torch.Tensor) -> list[torch.Tensor]:
        """parts [E, n, C_i] (node coefficients gathered per edge) -> orders of all the parts'
        channels side by side (views of one tensor).

        Each part is rotated on its own and the results concatenated, not the other way round:
        the gradient of a part is then a fresh contiguous tensor (bmm's backward), where a
        channel slice of the concatenation's gradient would be strided, and the backward of the
        gather that made the part (index_add) runs about 15x slower on a strided gradient, in
        each backward pass of conservative training (benchmarks/README.md)."""
        rotated = [torch.bmm(self.to_edge, part) for part in parts]
        edge_frame = rotated[0] if len(rotated) == 1 else torch.cat(rotated, dim=2)
        return list(edge_frame.split(self.order_sizes, dim=1))

    def rotate_to_nodes(self, orders: list[torch.Tensor]) -> torch.Tensor:
        """orders (all of them, or just orders[0]) -> [E, n, C] in the global frame, times the envelope."""
        if len(orders) == 1:
            return torch.bmm(self.to_node[:, :, : self.order_sizes[0]], orders[0])
        return torch.bmm(self.to_node, torch.cat(orders, dim=1))


def _fibonacci_sphere(count: int) -> torch.Tensor:
    """`count` well-spread unit vectors (float64); they make pinv(Y^l(X)) well conditioned."""
    index = torch.arange(count, dtype=torch.float64) + 0.5
    polar = torch.acos(1 - 2 * index / count)
    azimuth = math.pi * (1 + math.sqrt(5.0)) * index
    return torch.stack([
        torch.cos(azimuth) * torch.sin(polar),
        torch.cos(polar),
        torch.sin(azimuth) * torch.sin(polar),
    ], -1)
