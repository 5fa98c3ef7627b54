"""The base of every config section: unknown keys are errors, never silently ignored."""

from pydantic import BaseModel, ConfigDict

# Upper bound of learning-rate-like fields: above float32's range (3.4e38) torch cannot even hold
# the value, and no run needs anything near it; absurd values below it fail at run time as
# non-finite losses or weights.
MAX_RATE = 1e38


class Section(BaseModel):
    """A config section: strict about unknown keys, validated on assignment.

    strict: a boolean is not a number (lax mode reads `batch_size: true` as 1); a float field
    still takes an int (`lr: 1`). allow_inf_nan=False: `.inf` / `.nan` can only blow up later.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        # One line, always: `allowed` may quote a library's multi-line error.
        super().__init__(f"config error: {key}={value!r}: {' '.join(str(allowed).split())}")
