"""Processors of the mixpolicy LeRobot policy: batch and move tensors, nothing more.

The DenoisingPolicy normalizes its inputs and unnormalizes its actions itself (its
normalizer is saved with its weights), so neither pipeline holds a normalizer step; they are
built from LeRobot's standard steps and saved as LeRobot's processor files.
"""

from __future__ import annotations

from lerobot.processor import AddBatchDimensionProcessorStep, DeviceProcessorStep, RenameObservationsProcessorStep
from lerobot.processor.factory import make_policy_processor_pipelines

from lerobot_policy_mixpolicy.configuration_mixpolicy import MixpolicyConfig


def make_mixpolicy_pre_post_processors(config: MixpolicyConfig, dataset_stats=None):
    return make_policy_processor_pipelines(
        input_steps=[
            RenameObservationsProcessorStep(rename_map={}),
            AddBatchDimensionProcessorStep(),
            DeviceProcessorStep(device=config.device),
        ],
        output_steps=[DeviceProcessorStep(device="cpu")],
    )
