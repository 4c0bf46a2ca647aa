"""The one error a user's input can cause. Every layer raises it; nothing here imports the rest of sweep."""


class ConfigError(ValueError):
    """A config value sweep cannot run with. The message names the key, the value and what is allowed."""
