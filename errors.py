"""The user-error type, in a module of its own so that every layer (data/ included) may raise it."""


class UserError(SystemExit):
    """Bad input from the user (a flag, a file, data). A SystemExit: uncaught, it ends the command with its message
    and exit status 1, never a traceback; cli.run_main puts the command's name in front."""
