"""Keeps the CLIs' logs readable: drops the INFO chatter of orbax / grain / etils (every checkpoint logs dozens
of lines) from absl's handler; their warnings and errors still show."""

from __future__ import annotations

import logging


class QuietLibraries(logging.Filter):
    """A logging filter: records below WARNING from orbax, grain or etils are dropped."""

    LIBRARIES = ("orbax", "grain", "etils")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(f"/{lib}/" in record.pathname for lib in self.LIBRARIES)


def quiet_library_logs() -> None:
    """Adds `QuietLibraries` to absl's log handler (call it in a CLI's main)."""
    from absl import logging as absl_logging  # noqa: PLC0415
    absl_logging.get_absl_handler().addFilter(QuietLibraries())
