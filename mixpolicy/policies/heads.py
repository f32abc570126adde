"""Policy heads: how the network's outputs become the chunk's prediction, loss and samples.

The single-horizon head passes the network through. The mixture-of-horizons head
(:mod:`mixpolicy.policies.moh`) extends it. A head gets the network, the objective and the
condition tokens, so any head works with any network and objective.
"""

from __future__ import annotations

import torch
from torch import nn

from mixpolicy.policies.config import HeadConfig
from mixpolicy.policies.solvers import sample


def masked_mean(per_elem: torch.Tensor, prefix_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the elements of (..., B, H, A) whose action is not in the clean prefix (B, H)."""
    if prefix_mask is None:
        return per_elem.mean()
    keep = (~prefix_mask)[..., None].to(per_elem.dtype).expand_as(per_elem)
    return (per_elem * keep).sum() / keep.sum().clamp_min(1.0)


def select_rows(cond: torch.Tensor, prefix, rows: torch.Tensor | None):
    """The condition tokens and clean prefix of the samples ``rows`` (None: all of them)."""
    if rows is None:
        return cond, prefix
    return cond[rows], None if prefix is None else (prefix[0][rows], prefix[1][rows])


class SingleHead(nn.Module):
    """The network's prediction for the whole chunk; fixed execution of ``n_action_steps``."""

    def __init__(self, cfg: HeadConfig, horizon: int, net):
        super().__init__()
        self.cfg = cfg
        self.horizon = horizon

    @property
    def adaptive(self) -> bool:
        """True when the head chooses how many actions of each chunk run."""
        return False

    def forward(self, net, x, level, cond, step=None, prefix=None) -> torch.Tensor:
        return net(x, level, cond, step, prefix=prefix)

    def loss(self, net, objective, cond, actions, generator=None, prefix_mask=None):
        """(weighted denoising loss, logs); ``prefix_mask`` (B, H) marks actions given clean (no loss)."""
        prefix = None if prefix_mask is None else (actions, prefix_mask)

        def denoise(x, level, step=None, rows=None):
            c, p = select_rows(cond, prefix, rows)
            return self(net, x, level, c, step, p)

        per_elem = objective.loss(denoise, actions, generator)
        loss = masked_mean(per_elem, prefix_mask)
        return loss, {"denoise_loss": float(loss.detach())}

    @torch.no_grad()
    def sample(self, net, objective, cond, x, schedule, start=0, generator=None, constraint=None):
        """(clean chunks, executable lengths (B,) or None when fixed); ``constraint``: a prefix constraint."""
        denoise = lambda x_in, level, step=None, prefix=None: self(net, x_in, level, cond, step, prefix)  # noqa: E731
        return sample(objective, denoise, x, schedule, start, generator, constraint=constraint), None

    def execution_info(self, n_action_steps: int) -> dict:
        return {"execution": "fixed", "n_action_steps": n_action_steps}
