"""Run the CLI and send this process SIGTERM right after a given training step: a deterministic
interruption for the tests (no sleep-then-signal race with the training speed).

    python tests/sigterm_at_step.py TRAINER STEP protoknn-args...

TRAINER counts the Trainer objects the command builds (1 = the first run of a benchmark);
STEP is that trainer's global step after which the signal arrives. The product's own signal
handling then runs as it does for a real SIGTERM: the step in flight ends, the checkpoint is
written and the command exits with 130.
"""
import os
import signal
import sys

from protoknn_plugin.cli import main
from protoknn_plugin.train.trainer import Trainer


def arm(trainer_index: int, step: int) -> None:
    built = {"count": 0}
    original_init, original_step = Trainer.__init__, Trainer._train_step

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built["count"] += 1
        self.sigterm_armed = built["count"] == trainer_index

    def train_step(self, images, labels):
        terms = original_step(self, images, labels)
        if getattr(self, "sigterm_armed", False) and self.state.global_step + 1 == step:
            self.sigterm_armed = False
            os.kill(os.getpid(), signal.SIGTERM)
        return terms

    Trainer.__init__, Trainer._train_step = init, train_step


if __name__ == "__main__":
    arm(int(sys.argv[1]), int(sys.argv[2]))
    sys.argv = ["protoknn", *sys.argv[3:]]
    main()
