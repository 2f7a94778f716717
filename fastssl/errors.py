class UserError(Exception):
    """A problem with the user's input (a path, a value, a combination of options).

    The CLI prints it as one line, `error: <message>`, and exits with status 2: the message must name
    the file or value and say what to do.
    """


EXIT_STOPPED = 75  # EX_TEMPFAIL: try again later; what a requeued job's command does with --auto-resume


class Stopped(Exception):
    """A run stopped early by a signal (preemption, Ctrl-C) after writing its checkpoint: the CLI prints the
    message (how to continue) and exits with EXIT_STOPPED."""
