"""The two kinds of user-facing failure: a bad configuration and a bad case."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts.

    Carries every problem found (file, key, fix) so the user fixes them all in one go.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CaseError(Exception):
    """One case cannot be used; the others go on. The message is the reason shown in the QC report."""

    def __init__(self, case_id: str, reason: str):
        self.case_id = case_id
        self.reason = reason
        super().__init__(f"{case_id}: {reason}")


class InputError(ValueError):
    """A file's content is unusable (truncated, malformed, inconsistent geometry...).

    Raised by readers, which do not know the case; the per-case runner turns it into a ``CaseError``.
    """


class MessageError(ValueError):
    """A message from the server does not fit this site's model (names, shapes or dtypes); nothing is loaded."""


class SignatureError(Exception):
    """A model (file or message) has no valid signature from the study's signing key: it is not loaded.

    The message names the file or message and the fix.
    """
