class UserError(Exception):
    """A problem with the user's input (a path, a value, a combination of options).

    The CLI prints it as one line, `error: <message>`, and exits with status 2: the message must name
    the file or value and say what to do.
    """
