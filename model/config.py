"""Named network configurations of the HIH stacked hourglass.

Sizes are in pixels of the square network input (``input_size``) and of the integer heatmap
(``heatmap_size``); ``decimal_size`` is the side of the decimal grid that subdivides one integer-heatmap
pixel (8 in the paper: 1/8 of a heatmap pixel per bin).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HIHConfig:
    """Architecture and geometry of one HIH network."""

    num_points: int = 68
    num_stacks: int = 1
    channels: int = 64
    depth: int = 3
    input_size: int = 128
    heatmap_size: int = 32
    decimal_size: int = 8
    decimal_window: int = 5
    decimal_hidden: int = 128
    integer_sigma: float = 1.5
    decimal_sigma: float = 1.0
    crop_scale: float = 1.25

    @property
    def stride(self) -> float:
        """Input pixels per integer-heatmap pixel."""
        return self.input_size / self.heatmap_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> HIHConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


CONFIGS: dict[str, HIHConfig] = {
    # The paper's configurations: 256x256 input, 64x64 integer heatmaps, 8x8 decimal grid.
    "hih_b": HIHConfig(num_stacks=4, channels=256, depth=4, input_size=256, heatmap_size=64),
    "hih_s": HIHConfig(num_stacks=2, channels=256, depth=4, input_size=256, heatmap_size=64),
    "hih_t": HIHConfig(num_stacks=1, channels=256, depth=4, input_size=256, heatmap_size=64),
    # The CPU default: trains in about an hour on 2 cores and predicts a face in a few milliseconds.
    "hih_cpu": HIHConfig(num_stacks=2, channels=64, depth=4, input_size=128, heatmap_size=32),
    # A toy size for tests: overfits a handful of faces in seconds.
    "hih_tiny": HIHConfig(num_stacks=1, channels=32, depth=2, input_size=64, heatmap_size=16, decimal_hidden=32),
}


def get_config(name: str, num_points: int = 68) -> HIHConfig:
    """The named configuration, for a scheme with ``num_points`` landmarks."""
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose one of {', '.join(sorted(CONFIGS))}")
    values = CONFIGS[name].to_dict()
    values["num_points"] = num_points
    return HIHConfig(**values)
