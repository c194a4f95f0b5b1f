"""Benchmarks: runnable as `python -m benchmarks.<name>`."""


def without_flags(argv, flags):
    """argv minus the given flags, in either form ('--flag=v' or '--flag v'): what a benchmark passes on to the
    child processes it runs each side in."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True  # its value follows
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out
