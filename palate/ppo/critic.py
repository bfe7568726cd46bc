"""The value function V(s): a head on the policy's hidden states, or a critic of its own."""

from __future__ import annotations

import torch

__all__ = ["SeparateCritic", "ValueHead"]


class ValueHead(torch.nn.Module):
    """Scalar value per position from a backbone's hidden states (zero-initialised), computed
    in fp32 even under bf16 autocast (returns and advantages are fp32; the references' value
    head is fp32)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, H) → (B, T)
        with torch.autocast(device_type=h.device.type, enabled=False):
            return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


class SeparateCritic(torch.nn.Module):
    """A critic with its own decoder backbone and a value head."""

    def __init__(self, decoder: torch.nn.Module, head: ValueHead):
        super().__init__()
        self.decoder = decoder
        self.head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, Tq + T)
        attention_mask: torch.Tensor,  # (B, Tq + T)
        position_ids: torch.Tensor,  # (B, Tq + T)
        start: int,
        length: int,
    ) -> torch.Tensor:  # (B, T) values at positions start … start+length-1
        h = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.head(h[:, start : start + length])
