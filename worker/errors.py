"""One exception root for everything riverline raises on purpose."""

from __future__ import annotations


class RiverlineError(Exception):
    """Base class: a failure of riverline itself, reported without a stack trace."""

    exit_code = 1


class ConfigError(RiverlineError):
    """Bad flags, environment or files: the worker refuses to start (exit code 2)."""

    exit_code = 2


class BrokerError(RiverlineError):
    """The local Kafka broker could not be started, stopped or reached."""
