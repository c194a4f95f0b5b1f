"""Benchmarks: runnable as `python -m benchmarks.<name>`."""


def without_flags(argv, flags):
    """argv minus the given flags, in either form ('--flag=v' or '--flag v'): what a benchmark passes on to the
    child processes it runs each side in."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True  # its value follows
        elif not a.startswith(tuple(f + "=" for f in flags)):
            out.append(a)
    return out


# The DBRX shape fields the benchmarks take as flags or shape tables.
DBRX_SHAPE_FIELDS = ('d_model', 'n_heads', 'kv_n_heads', 'n_layers', 'vocab_size', 'ffn_hidden_size',
                     'moe_num_experts', 'moe_top_k')


def dbrx_config(shape, **overrides):
    """The benchmarks' DbrxConfig for a shape (a dict, or an argparse namespace, holding DBRX_SHAPE_FIELDS).

    Every DBRX feature stays on: clip_qkv 8 (random weights do reach it, so the clamp is exercised), RoPE base
    10000; router jitter is off so mosaicjax and transformers route the same tokens to the same experts.
    """
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    get = shape.get if isinstance(shape, dict) else lambda name: getattr(shape, name)
    return dbrx.DbrxConfig(**{name: get(name) for name in DBRX_SHAPE_FIELDS}, clip_qkv=8.0, rope_theta=10000.0,
                           moe_jitter_eps=0.0, **overrides)
