"""An independent float64 NorMuon, written line by line from Algorithm 1 of the paper (and the
released code's variant), one matrix at a time with plain loops. It shares no code with normuon.py:
the tests check normuon.py against it."""

import math

import torch

A, B, C = 3.4445, -4.7750, 2.0315


def newton_schulz_float64(matrix, coefficients=(A, B, C), steps=5, safety=1.0):
    """NS in float64: X0 = M / (safety ||M||_F) (transposed when tall), then per step
    X <- a X + b (X Xᵀ) X + c (X Xᵀ)² X. ``coefficients``: one (a, b, c) or one per step."""
    schedule = coefficients if isinstance(coefficients[0], (tuple, list)) else [coefficients] * steps
    x = matrix.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(safety * x.norm().item(), 1e-7)
    for a, b, c in schedule[:steps]:
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


class ReferenceNorMuon:
    """Holds W, M, v for one matrix in float64 and applies one step per call to ``step(grad)``."""

    def __init__(self, weight, lr, momentum=0.95, beta2=0.95, weight_decay=0.0, nesterov=False, eps=1e-10,
                 adjust_lr_fn="match_rms_adamw", normalize=True, orthogonalize=newton_schulz_float64,
                 cautious_weight_decay=False, neuron_axis="output"):
        self.orthogonalize = orthogonalize
        self.weight = weight.double().clone()
        self.momentum_buffer = torch.zeros_like(self.weight)
        m, n = self.weight.shape
        self.by_column = neuron_axis == "larger" and n > m  # nanochat's axis: the larger one
        self.second_moment = torch.zeros(n if self.by_column else m, dtype=torch.float64)
        self.cautious = cautious_weight_decay
        self.lr, self.beta1, self.beta2, self.weight_decay = lr, momentum, beta2, weight_decay
        self.nesterov, self.eps, self.adjust_lr_fn, self.normalize = nesterov, eps, adjust_lr_fn, normalize

    def step(self, grad):
        grad = grad.double()
        m, n = self.weight.shape
        # M_t = β1 M_{t-1} + (1 - β1) G_t
        self.momentum_buffer = self.beta1 * self.momentum_buffer + (1 - self.beta1) * grad
        to_orthogonalize = self.momentum_buffer
        if self.nesterov:  # the released code: G_t + β1 (M_t - G_t)
            to_orthogonalize = (1 - self.beta1) * grad + self.beta1 * self.momentum_buffer
        orthogonal = self.orthogonalize(to_orthogonalize)  # O_t
        if not self.normalize:  # Muon, with torch.optim.Muon's scale rules
            if self.adjust_lr_fn == "match_rms_adamw":
                step_size = self.lr * 0.2 * math.sqrt(max(m, n))
            else:
                step_size = self.lr * math.sqrt(max(1, m / n))
            direction = orthogonal
        elif self.by_column:  # the same, one number per column: mean over the m rows
            for column in range(n):
                mean_square = sum(orthogonal[i, column].item() ** 2 for i in range(m)) / m
                self.second_moment[column] = (self.beta2 * self.second_moment[column]
                                              + (1 - self.beta2) * mean_square)
            direction = orthogonal / (self.second_moment.sqrt()[None, :] + self.eps)
        else:
            for row in range(m):  # v_t = β2 v_{t-1} + (1 - β2) mean_j O_ij²
                mean_square = sum(orthogonal[row, j].item() ** 2 for j in range(n)) / n
                self.second_moment[row] = self.beta2 * self.second_moment[row] + (1 - self.beta2) * mean_square
            direction = orthogonal / (self.second_moment.sqrt()[:, None] + self.eps)  # Ô_t
        if self.normalize and self.adjust_lr_fn == "match_rms_adamw":  # η̂_t = 0.2 η sqrt(mn) / ||Ô_t||_F
            step_size = 0.2 * self.lr * math.sqrt(m * n) / direction.norm().item()
        elif self.normalize:  # back to ||O_t||_F, times Muon's sqrt(max(1, m/n)), Muon-scale lr
            step_size = self.lr * orthogonal.norm().item() / direction.norm().item() * math.sqrt(max(1, m / n))
        # W_t = W_{t-1} - η λ W_{t-1} - η̂_t Ô_t; cautious: decay only where Ô_t and W_{t-1} agree in sign
        decayed = self.weight * (direction * self.weight >= 0) if self.cautious else self.weight
        self.weight = self.weight - self.lr * self.weight_decay * decayed - step_size * direction
        return self.weight
