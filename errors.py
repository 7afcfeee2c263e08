"""The user-error type, in a module of its own so that every layer (data/ included) may raise it, and the messages
that name a bad flag."""
from dataclasses import fields


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


def check_choices(cfg, method, prefix):
    """Each field of a config dataclass whose metadata lists "choices" holds one of them (else a ValueError
    naming the flag); the add-ons' configs call it from __post_init__."""
    for f in fields(cfg):
        allowed, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"unknown {method} {f.name} (--{prefix}-{f.name.replace('_', '-')}) {value!r}; "
                             f"choose from {allowed}")
