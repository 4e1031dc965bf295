"""User-facing errors: ``train.py`` prints them as one line (no traceback) and exits 2."""


class UserError(Exception):
    """A problem in the user's input (config, flags, files) with a message that says the fix."""


class ConfigError(UserError, ValueError):
    """A config key with a value it does not accept; the message names key, value and what is allowed."""


class DatasetError(UserError, ValueError):
    """A problem with a dataset on disk, as one line: ``<dataset>: <problem>: <path>. Fix: <fix>``.

    Args:
        dataset: registry name of the dataset (e.g. ``"OxfordPets"``).
        problem: what is wrong, e.g. ``"split file not found"``.
        path: the file or folder concerned.
        fix: what the user should do.
    """

    def __init__(self, dataset: str, problem: str, path: str, fix: str):
        self.dataset, self.problem, self.path, self.fix = dataset, problem, path, fix
        message = f"{dataset}: {problem}: {path}. Fix: {fix}"
        super().__init__(" ".join(message.splitlines()))  # one line whatever the parts hold

    def __reduce__(self):  # keep picklable (DataLoader workers) despite the custom __init__
        return (type(self), (self.dataset, self.problem, self.path, self.fix))
