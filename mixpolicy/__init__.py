"""mixpolicy: transformer denoising policies for robot imitation learning."""

__version__ = "0.1.0"
