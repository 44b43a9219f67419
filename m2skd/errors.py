"""Error types that carry the offending path, so a user can find the bad file at once."""


class M2SKDError(Exception):
    """Base class for errors m2skd reports to users (printed without a traceback)."""


class DataError(M2SKDError):
    """Input data is malformed; the message names the file and what is wrong."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # raised in a joblib/Dask worker, it must unpickle in the parent
        return type(self), (self.path, self.problem)


class StaleInputError(M2SKDError):
    """A stage's inputs do not match what the run directory recorded."""
