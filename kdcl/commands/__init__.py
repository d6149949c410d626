"""The work behind each ``kdcl`` command: ``train``, ``eval``, ``bench`` and ``report``."""
