"""Errors that carry one clear line for the user: the file or field at fault and what is wrong.
The CLI prints them without a traceback."""


class LevanteError(Exception):
    """Base class for errors a user can fix (bad files, bad input)."""


class CheckpointError(LevanteError):
    """A model file is missing, corrupt, or of a kind we do not support."""


class TokenizerError(LevanteError):
    """The tokenizer is missing or cannot encode the given conversation."""
