"""Train a model from gin experiment configs.

  python -m mosaicjax.train --gin_file=experiments/quickstart.gin --workdir=/tmp/run [--gin_param=train.num_steps=50]

Re-running the same command resumes from the newest complete checkpoint in <workdir>/checkpoints.
"""
from absl import app, flags

flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); later files override earlier ones.")
flags.DEFINE_multi_string("gin_param", [], "Gin binding(s), e.g. train.num_steps=100; override the files.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, config.gin, TensorBoard.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.DEFINE_bool("distributed_auto", False, "Let JAX detect the cluster (TPU pods, SLURM) and initialise.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import sys
    from absl import logging
    # Orbax and grain log every file they touch at INFO; progress lines are ours (stderr), keep theirs to warnings.
    logging.set_verbosity(logging.WARNING)
    from mosaicjax import config
    from mosaicjax.parallel import distributed
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           auto=FLAGS.distributed_auto)
    try:
        config.parse(FLAGS.gin_file, FLAGS.gin_param)
        from mosaicjax.trainer import loop
        loop.train(FLAGS.workdir)
    except config.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    from mosaicjax import host_memory
    host_memory.reexec_with_huge_pages()  # on CPU: glibc's huge-page tunable, read only at process start
    app.run(main)
