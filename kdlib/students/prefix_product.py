"""Ordered products of per-token matrices in log-depth parallel steps, and their sequential references.

CMOW encodes a sequence as the product M_1 M_2 ... M_T of its tokens' matrices (CMOW paper sec. III-A);
the paper names computing it in parallel as future work. Matrix multiplication is associative, so:

- `matrix_product`: pairwise tree reduction, ceil(log2 T) steps of batched matmuls, T - 1 products in all.
- `prefix_products`: Hillis-Steele inclusive scan, ceil(log2 T) steps; every prefix M_1 ... M_t at once
  (the per-token representations of sec. III-A).

Padded positions (mask == 0) count as identity matrices, so padding never changes a product.
"""

from __future__ import annotations

import torch


def mask_to_identity(mats: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Replace the matrices at padded positions by the identity: (B, T, d, d), (B, T) -> (B, T, d, d)."""
    if mask is None:
        return mats
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    return torch.where(mask.bool()[..., None, None], mats, eye)


def matrix_product(mats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """M_1 M_2 ... M_T by tree reduction: (B, T, d, d) -> (B, d, d)."""
    p = mask_to_identity(mats, mask)
    b, t, d, _ = p.shape
    if t == 0:
        return torch.eye(d, dtype=mats.dtype, device=mats.device).expand(b, d, d).clone()
    while p.shape[1] > 1:
        if p.shape[1] % 2:  # pad with one identity so neighbours pair up; order is preserved
            eye = torch.eye(d, dtype=p.dtype, device=p.device).expand(b, 1, d, d)
            p = torch.cat([p, eye], dim=1)
        p = p[:, 0::2] @ p[:, 1::2]  # (B, T/2, d, d): left neighbour times right neighbour
    return p[:, 0]


def prefix_products(mats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """All prefixes P_t = M_1 ... M_t by a Hillis-Steele scan: (B, T, d, d) -> (B, T, d, d).

    After the step with offset o, P_t holds the product of the window M_{t-o'+1} ... M_t with o' = 2o
    (clipped at 1); each step multiplies the window ending o earlier on the *left*, keeping the order.
    """
    p = mask_to_identity(mats, mask)
    offset = 1
    while offset < p.shape[1]:
        p = torch.cat([p[:, :offset], p[:, :-offset] @ p[:, offset:]], dim=1)
        offset *= 2
    return p


def sequential_matrix_product(mats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `matrix_product`: T - 1 dependent matmuls, left to right."""
    return sequential_prefix_products(mats, mask)[:, -1]


def sequential_prefix_products(mats: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `prefix_products`: P_t = P_{t-1} M_t one step at a time."""
    p = mask_to_identity(mats, mask)
    out = [p[:, 0]]
    for t in range(1, p.shape[1]):
        out.append(out[-1] @ p[:, t])
    return torch.stack(out, dim=1)
