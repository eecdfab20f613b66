"""Errors that are the user's to fix: the command line prints them as one line and exits with code 2
(``--debug`` shows the traceback). Everything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a setting, a path, a damaged file); the message says what to do."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""


class RunDirError(UserError):
    """The output directory already holds a run and neither resuming nor overwriting was asked for."""


class CheckpointError(UserError):
    """No usable checkpoint where one was asked for; the message names the file or directory."""


class CheckpointFormatError(UserError, ValueError):
    """A checkpoint directory that cannot be read or converted between the original and transformers Janus
    layouts; the message says what to do."""


class ResumeError(UserError):
    """A resume would silently change the run (changed settings); the message names each key."""


class RewardError(UserError):
    """A reward function failed (after its retries); the message names the reward and the options."""


class DivergenceError(UserError):
    """Training produced non-finite values; the message names the step and the last good checkpoint."""
