"""The user-error type, in a module of its own so that every layer (data/ included) may raise it."""


class UserError(SystemExit):
    """Bad input from the user (a flag, a file, data). A SystemExit: uncaught, it ends the command with its message
    and exit status 1, never a traceback; cli.run_main puts the command's name in front."""


def bad_flag(checks, values):
    """The message for the first of `checks`, (dest, bad, rule) triples, whose `bad` is true ("--dest must be rule,
    got value"), or None. values: the flags' values by dest (a dict or an object with them as attributes)."""
    for dest, bad, rule in checks:
        if bad:
            value = values[dest] if isinstance(values, dict) else getattr(values, dest)
            shown = repr(value) if isinstance(value, str) else value
            return f"--{dest.replace('_', '-')} must be {rule}, got {shown}"
    return None
