"""Names kept where existing code imports them; the backends live in their own modules.

``backend`` (PolicyClient, PolicySpec, InferenceResult), ``local`` (LocalPolicy),
``remote`` (RemotePolicy), ``subprocess_backend`` (SubprocessPolicy).
"""

from mixpolicy.deploy.backend import InferenceResult, PolicyClient, PolicySpec
from mixpolicy.deploy.local import LocalPolicy, action_range, load_local_policy, policy_spec

__all__ = ["InferenceResult", "LocalPolicy", "PolicyClient", "PolicySpec", "action_range", "load_local_policy", "policy_spec"]
