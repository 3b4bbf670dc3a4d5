"""The one error type a user can fix, shared by the command line and the server."""


class UserError(Exception):
    """A bad argument, a missing file, data or weights that cannot be used: printed as one line
    (``lra-ee: error: ...``, or ``lra-ee serve: error: ...``), exit code 2, no traceback."""


EXIT_USAGE = 2  # the exit code of a UserError
