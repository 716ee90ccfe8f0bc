"""``python -m dit_jax.train --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]``.

Multi-host: ``--coordinator_address HOST:PORT --num_processes N --process_id I`` on every host (GPU clusters, CPU
tests); on multi-host TPU slices ``jax.distributed`` discovers the hosts by itself.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "configs", "quickstart.py")  # fmt: skip

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file (configs/NAME.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, TensorBoard events, samples.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 for jax.distributed (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (multi-host).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from dit_jax.parallel.mesh import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from dit_jax.train.trainer import ConfigError, NonFiniteError, quiet_library_logs, train_and_evaluate

    logging.set_verbosity(logging.INFO)
    quiet_library_logs()
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        logging.error("%s", e)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
