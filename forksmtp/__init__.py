"""forksmtp: a pre-forking SMTP receiver that stores mail durably in Maildir."""

from . import _native

__version__ = "0.1.0"

# Before any submodule loads: use the mypyc-compiled modules only if they match the
# source (see _native).
_native.select(__path__[0])
