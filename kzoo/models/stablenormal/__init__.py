"""StableNormal-style image-to-normal estimation: YOSO, SG-DRN and the pipeline that runs them."""
from .estimator import (ESTIMATORS, YOSO, assumed_intrinsics, ray_directions, visible_hemisphere, yoso_conv,
                        yoso_kat)
from .refiner import REFINERS, SGDRN, sgdrn_small
from .sampling import DEFAULT_STEPS, StableNormal, alphas_cumprod, heuristic_timesteps, noise_timesteps

__all__ = ["ESTIMATORS", "REFINERS", "YOSO", "SGDRN", "StableNormal", "DEFAULT_STEPS", "alphas_cumprod",
           "assumed_intrinsics", "heuristic_timesteps", "noise_timesteps", "ray_directions", "sgdrn_small",
           "visible_hemisphere", "yoso_conv", "yoso_kat"]
