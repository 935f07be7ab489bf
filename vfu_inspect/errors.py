"""Errors the user can act on, shared by the modules that raise and report them."""


class UserError(Exception):
    """A problem the user can fix: printed as one line, exit status 2."""


class CaptureError(Exception):
    """The file is not a capture vfu-inspect can read."""


class ListenError(Exception):
    """A UNIX socket cannot be listened on (path in use, not a socket …)."""
