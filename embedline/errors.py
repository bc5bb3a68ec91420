"""The base of every error embedline reports to a user (the CLI prints these as one line)."""


class EmbedlineError(Exception):
    """An error with a message meant for the user, not a bug."""
