"""Run the CLI under a local Ray whose workers SIGKILL themselves once, mid-run: the worker that
trains the run directory named by $PROTOKNN_KILL_RUN dies right after training step
$PROTOKNN_KILL_STEP, the first time only ($PROTOKNN_KILL_MARK records that it happened).
A deterministic worker death for the tests, at any speed:

    PROTOKNN_KILL_RUN=cnn- PROTOKNN_KILL_STEP=4 PROTOKNN_KILL_MARK=killed python tests/ray_kill_worker.py args...
"""
import os
import signal
import sys


def arm() -> None:
    """Ray's worker_process_setup_hook: patch the Trainer in every worker process."""
    from protoknn_plugin.train.trainer import Trainer

    original_step = Trainer._train_step

    def train_step(self, images, labels):
        terms = original_step(self, images, labels)
        chosen = os.path.basename(str(self.out_dir)).startswith(os.environ["PROTOKNN_KILL_RUN"])
        if chosen and self.state.global_step + 1 == int(os.environ["PROTOKNN_KILL_STEP"]):
            try:
                os.close(os.open(os.environ["PROTOKNN_KILL_MARK"], os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return terms
            os.kill(os.getpid(), signal.SIGKILL)
        return terms

    Trainer._train_step = train_step


if __name__ == "__main__":
    import ray

    from protoknn_plugin.cli import main

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "ray_kill_worker.arm"})
    sys.argv = ["protoknn", *sys.argv[1:]]
    main()
