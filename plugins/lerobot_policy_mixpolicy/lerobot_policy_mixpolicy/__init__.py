"""mixpolicy's denoising policy as a LeRobot policy plugin (``--policy.type=mixpolicy``).

LeRobot imports this package at start-up (its name starts with ``lerobot_policy_``); the
config registers itself, and LeRobot finds the policy class in ``modeling_mixpolicy`` and
the processors in ``processor_mixpolicy`` by its naming convention.
"""

from lerobot_policy_mixpolicy.configuration_mixpolicy import MixpolicyConfig

__all__ = ["MixpolicyConfig"]
