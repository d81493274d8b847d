"""ddpmctl's built-in sampler plugins, registered as entry points exactly as a third party would."""

from pydantic import Field

from ddpmctl import Sampler


class ClipOptions(Sampler.Options):
    """The option every built-in sampler that walks x_hat has (ancestral, strided, student)."""

    clip_denoised: bool = Field(True, description="clamp the predicted x_0 to [-1, 1] at every step")
