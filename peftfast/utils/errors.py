"""The errors peftfast raises for bad configurations and adapter operations.

They live at the bottom of the package so that every layer can raise and catch them (save/load in
``utils`` catches what the tuners raise) without importing upward. All but AdapterSaveError (an OSError) are
ValueErrors, as PEFT's errors for the same situations are. ``peftfast.config`` re-exports ConfigError and
``peftfast.tuners.tuners_utils`` re-exports AdapterError, where users have always found them.
"""


class PeftError(Exception):
    """PEFT's base error class (``peft.PeftError``): code that catches it keeps working."""


class NoMatchingPeftModuleError(PeftError, ValueError):
    """An adapter's ``target_modules`` matched no module of the model (PEFT's error of the same name)."""


class PeftWarning(UserWarning):
    """PEFT's base warning class (``peft.PeftWarning``)."""


class ConfigError(ValueError):
    """An adapter configuration is invalid or cannot be used by peftfast."""


class ConfigKeysMissingError(ConfigError, TypeError):
    """A file offered as adapter_config.json lacks the keys every adapter config has (``peft_type``): it is not
    an adapter config. A TypeError as well, as PEFT raises for the same file."""


class AdapterError(ValueError):
    """An adapter name or adapter operation is not valid for this model."""


class AdapterSaveError(OSError):
    """Saving adapter files failed (disk full, no permission, a folder name taken by a file, a rename refused,
    another process holding the folder's save lock past the timeout, ...).

    ``filename`` is the path being written when it failed, ``errno`` the cause's errno where known (e.g.
    ``errno.ENOSPC`` for a full disk), ``__cause__`` the original exception. When ``committed`` is False the
    folder was left exactly as before the save; when True every new file had been fully written and the save
    was committed, but moving the files into place failed: the next save or load of the folder completes it.
    Unlike the other errors here it is an OSError (what a failed file write raises), not a ValueError.
    """

    def __init__(self, path: str, cause: object, errno: "int | None" = None, committed: bool = False):
        message = f"could not save adapter files to {path}: {cause}"
        super().__init__(message)
        self.errno = errno
        self.strerror = str(cause)
        self.filename = path
        self.committed = committed
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.filename, self.strerror, self.errno, self.committed))
