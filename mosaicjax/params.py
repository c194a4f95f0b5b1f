"""Parameter counts and per-device training memory of an experiment config (DBRX, or image with train.task='image').

  python -m mosaicjax.params --gin_file=experiments/dbrx/dbrx_132b.gin [--gin_param=...] \
      [--num_devices=1024] [--device_memory_gib=80]

Prints `total_params=N active_params=N` (first line, always), the per-component table, then the bytes one device
holds for a training step (parameters, AdamW state, gradients, an activation estimate; formula in
mosaicjax/models/sizing.py) on the config's mesh.shape laid over --num_devices, and whether that fits
--device_memory_gib. No devices are needed for the plan: --num_devices may exceed what this machine has.

Image configs (experiments/imageai/*.gin, train.task = 'image'): the model is image.init_from's configs (the size
files point it at experiments/imageai/architectures/<size>/, the published configs); the table lists each
component, what trains, and the plan adds the EMA and the frozen components (mosaicjax/models/image_sizing.py).
"""
from absl import app, flags

flags.DEFINE_multi_string("gin_file", [], "Gin config file(s); later files override earlier ones.")
flags.DEFINE_multi_string("gin_param", [], "Gin binding(s), e.g. mesh.shape={'data': -1, 'fsdp': 64}.")
flags.DEFINE_integer("num_devices", None, "Devices to plan the mesh for (default: jax.device_count()).")
flags.DEFINE_float("device_memory_gib", None, "Memory per device in GiB (default: this machine's accelerator "
                   "memory when the backend reports it, else no fit verdict).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import sys
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # gin and jax log every file and backend probe at INFO
    from mosaicjax import config
    try:
        config.parse(FLAGS.gin_file, FLAGS.gin_param)
        import jax
        from mosaicjax.models import dbrx, sizing
        from mosaicjax.parallel import mesh as mesh_lib
        from mosaicjax.parallel import rules as rules_lib
        from mosaicjax.trainer import optimizer as optimizer_lib
        from mosaicjax.trainer.config import TrainConfig

        train = TrainConfig()
        if train.task == "image":
            _image_report(train)
            return
        cfg = dbrx.DbrxConfig()
        params = sizing.abstract_params(cfg)
        print(sizing.format_counts(cfg, sizing.component_counts(cfg, params)), flush=True)

        explicit = FLAGS.num_devices is not None
        num_devices = FLAGS.num_devices if explicit else jax.device_count()
        memory = (int(FLAGS.device_memory_gib * sizing.GIB) if FLAGS.device_memory_gib
                  else sizing.device_memory_bytes())
        tx, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), train.num_steps)
        try:
            plan = sizing.memory_plan(
                cfg, mesh_lib.MeshConfig().shape, num_devices, batch_size=train.batch_size, seq_len=train.seq_len,
                grad_accum_steps=train.grad_accum_steps, rules=rules_lib.get_rules(), tx=tx, device_memory=memory,
                params=params)
        except mesh_lib.MeshError as e:
            _not_planned(e, explicit)
            return
        print()
        print(sizing.format_plan(cfg, plan, batch_size=train.batch_size, seq_len=train.seq_len,
                                 grad_accum_steps=train.grad_accum_steps), flush=True)
    except (config.ConfigError, ValueError) as e:
        print(f"configuration error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _not_planned(error, explicit: bool) -> None:
    """The mesh does not fit the device count: say how to plan anyway; exit 2 when --num_devices was given."""
    import sys
    print(f"\nmemory per device: not planned: {error}\n(pass --num_devices=N to plan for the slice the config is "
          f"meant for, or override --gin_param=\"mesh.shape={{...}}\")", flush=True)
    if explicit:
        sys.exit(2)


def _image_report(train):
    """train.task='image': the components of image.init_from (counts, trained) and the per-device memory plan."""
    import jax
    from mosaicjax.data import images as images_lib
    from mosaicjax.diffusion import training as training_lib
    from mosaicjax.models import image_sizing, sizing
    from mosaicjax.parallel import mesh as mesh_lib
    from mosaicjax.trainer import optimizer as optimizer_lib
    from mosaicjax.trainer.tasks import image as image_task

    explicit = FLAGS.num_devices is not None
    num_devices = FLAGS.num_devices if explicit else jax.device_count()
    memory = (int(FLAGS.device_memory_gib * sizing.GIB) if FLAGS.device_memory_gib
              else sizing.device_memory_bytes())
    tx, _ = optimizer_lib.make_optimizer(optimizer_lib.OptimizerConfig(), train.num_steps)
    counts, plan = image_sizing.report(image_task.ImageConfig(), images_lib.ImageDataConfig(),
                                       training_lib.DiffusionConfig(), train, tx)
    print(counts, flush=True)
    try:
        text, _ = plan(mesh_lib.MeshConfig().shape, num_devices, memory)
    except mesh_lib.MeshError as e:
        _not_planned(e, explicit)
        return
    print()
    print(text, flush=True)


if __name__ == "__main__":
    app.run(main)
