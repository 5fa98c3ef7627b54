"""The base of every config section: unknown keys are errors, never silently ignored."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: strict about unknown keys, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config value that cannot be used; the message names key, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r}: {allowed}")
