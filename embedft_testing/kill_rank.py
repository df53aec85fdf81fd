"""`torchrun ... -m embedft_testing.kill_rank RANK N train ARGS...`: embedft's command line, where
rank RANK kills itself (SIGKILL, as a lost node) right after its N-th checkpoint of the run."""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    victim, after = int(sys.argv[1]), int(sys.argv[2])
    import embedft.training.loop as loop

    real, done = loop._checkpoint, []

    def checkpoint_then_die(*args, **kwargs):
        real(*args, **kwargs)
        done.append(1)
        if len(done) == after and int(os.environ.get("RANK", "0")) == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    loop._checkpoint = checkpoint_then_die
    from embedft.cli import main as cli

    sys.argv = ["embedft", *sys.argv[3:]]
    cli()


if __name__ == "__main__":
    main()
