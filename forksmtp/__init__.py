"""forksmtp: a pre-forking SMTP receiver that stores mail durably in Maildir."""

__version__ = "0.1.0"
