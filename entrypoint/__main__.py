"""`python -m entrypoint`, and the `mlserver-entrypoint` script: the stop signals are blocked
before anything else is imported, so a stop from the end of the interpreter's own start on is seen."""

import signal


def run() -> None:
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    from entrypoint.cli import main

    main(mask=mask)


if __name__ == "__main__":
    run()
