"""How a shot is conditioned: its `ShotMode`, the frames each mode is given, the transitions.

Standard library only: the specs, the config, the shot step, the conditioning code and the
pipeline all read the modes and their given-frame counts from here.
"""
from __future__ import annotations

import enum

MOTION_FRAMES = 5  # MM2V continues from the previous shot's last 5 frames


class ShotMode(enum.StrEnum):
    """How a shot is conditioned (the values are what records and APIs carry)."""

    T2V = "t2v"  # text only (Wan2.2 T2V experts)
    MR2V = "mr2v"  # first shot of a story with reference images as memory
    M2V = "m2v"  # memory-conditioned
    MI2V = "mi2v"  # memory + the previous shot's last frame
    MM2V = "mm2v"  # memory + the previous shot's last MOTION_FRAMES frames
    M2V_NO_MEMORY = "m2v-no-memory"  # memory off and no T2V experts: M2V with no memory

    @property
    def given_frames(self) -> int:
        """Leading frames given as conditioning (dropped from the saved shot)."""
        return {ShotMode.MI2V: 1, ShotMode.MM2V: MOTION_FRAMES}.get(self, 0)

    @property
    def uses_memory(self) -> bool:
        return self in (ShotMode.MR2V, ShotMode.M2V, ShotMode.MI2V, ShotMode.MM2V)

    @classmethod
    def given(cls, count: int) -> "ShotMode":
        """The memory-conditioned mode given `count` leading frames: M2V (0), MI2V (1),
        MM2V (MOTION_FRAMES)."""
        for mode in (cls.M2V, cls.MI2V, cls.MM2V):
            if mode.given_frames == count:
                return mode
        raise ValueError(f"no shot mode is given {count} frames")


# How a `cut: false` shot continues the previous one (RenderConfig.transition): MI2V, MM2V,
# or "none" (every shot M2V).
TRANSITIONS = (ShotMode.MI2V.value, ShotMode.MM2V.value, "none")
