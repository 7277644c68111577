"""The library's errors, under one base class, so a caller can catch everything reflectagent
raises on purpose (``except ReflectAgentError``) without catching bugs.

Each error's message says what went wrong and what to fix; the command line prints it as one
line instead of a traceback.
"""


class ReflectAgentError(Exception):
    """Base of every error reflectagent raises on purpose."""


class ConfigError(ReflectAgentError, ValueError):
    """A configuration that cannot be used, with what to fix (the config file's, a setting's, an environment
    variable's). Here, below every layer that reads one; :mod:`reflectagent.calling.config` answers to it too."""
