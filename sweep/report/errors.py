"""The one error a report raises for what a user asked: the CLI prints it on one line and exits 2."""


class ReportError(ValueError):
    pass
