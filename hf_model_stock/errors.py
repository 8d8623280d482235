"""Exceptions with one-line messages that name the file, tensor or recipe key at fault."""


class ModelStockError(Exception):
    """Base class: every error the tool reports to users derives from it (exit code 2 in the CLI)."""


class RecipeError(ModelStockError):
    """The recipe is malformed or inconsistent (names the key, and the line where known)."""


class CheckpointError(ModelStockError):
    """A checkpoint file or index is unreadable or malformed (names the file)."""


class CompatibilityError(ModelStockError):
    """The models cannot be merged together (names the tensor or config key)."""


class SourceError(ModelStockError):
    """A model source cannot be resolved or downloaded (names the source)."""


class NetworkError(SourceError):
    """The network failed for good, after the retries, while a merge streamed from the Hub (names the
    file and the byte): the tensors merged before can be kept for ``--resume``."""


class LeaderboardError(ModelStockError):
    """A leaderboard spec is malformed, or a batch cannot start (names the key or the model)."""
