"""Choosing an implementation by the platform a program is lowered for (not JAX's default backend).

A program compiled ahead of time for a TPU on a CPU host (``dtf_jax.tpu_target``) must get the
TPU's choices. Where the options per platform differ, each is traced and
``jax.lax.platform_dependent`` keeps the target's at lowering (the compiler never sees the
others); where they agree, the one option is traced alone.
"""

import functools

import jax

# JAX's lowering platforms and the kind ('cpu', 'gpu', 'tpu') each belongs to.
PLATFORMS = {'cpu': 'cpu', 'cuda': 'gpu', 'rocm': 'gpu', 'tpu': 'tpu'}


def per_platform(choice, run, *args):
  """``run(choice(kind), *args)`` for the kind of platform the program is lowered for:
  ``choice`` maps 'cpu' / 'gpu' / 'tpu' to a hashable option."""
  options = {platform: choice(kind) for platform, kind in PLATFORMS.items()}
  if len(set(options.values())) == 1:
    return run(options['cpu'], *args)
  branches = {}  # one branch per distinct option (platform_dependent joins identical ones)
  for option in options.values():
    branches.setdefault(option, functools.partial(run, option))
  return jax.lax.platform_dependent(
      *args, **{platform: branches[option] for platform, option in options.items()})
