"""Reward plug-ins for tests (config.reward.fn = 'reward_plugins:<name>').

The random and micro test policies never answer a toy task correctly, so the built-in
verifiers give every response reward 0 and GRPO sees no signal. These rewards spread
inside every group of samples, so advantages are non-zero and learning is visible."""


def digit_fraction(response: str, example) -> float:
  """The fraction of the response's characters that are digits (0 for an empty one)."""
  text = response.strip()
  return sum(c.isdigit() for c in text) / max(len(text), 1)
