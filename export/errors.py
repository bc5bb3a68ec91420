"""The error the export stage reports to a user (the CLI prints it as one line)."""

from embedline.errors import EmbedlineError


class ExportError(EmbedlineError):
    """An export step failed, or an exported variant does not agree with the PyTorch encoder."""
