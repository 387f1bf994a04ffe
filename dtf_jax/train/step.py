"""The jitted train step: loss, gradients (with accumulation), mixup / CutMix, the update."""

import einops
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dtf_jax.errors import UserError
from dtf_jax.train.config import Setup
from dtf_jax.train.sharding import MeshJit


class NonFiniteLossError(UserError, RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def cutmix_box(rng, height: int, width: int, lam):
  """A box covering about ``1 - lam`` of the frame (centre uniform, clipped at the borders):
  ``(y0, y1, x0, x1)`` int32 scalars."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  return (jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
          jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width))


def mix_batch(rng, video, targets, mixup_alpha: float, cutmix_alpha: float):
  """Mixup or CutMix of a batch with itself reversed (example ``i`` with ``B - 1 - i``).

  ``video``: ``B T H W C``; ``targets``: ``B num_classes`` (soft labels). With both on, each
  batch uses one of them with probability 1/2. Mixup: ``lam ~ Beta(a, a)``, videos and targets
  mixed by ``lam``. CutMix: one box (the same in every frame) from the partner, ``lam`` = the
  kept area. Returns the mixed video and targets."""
  rng_choice, rng_lam, rng_box = jax.random.split(rng, 3)
  partner_video, partner_targets = video[::-1], targets[::-1]

  def mixup(_):
    lam = jax.random.beta(rng_lam, mixup_alpha, mixup_alpha)
    return (lam * video + (1 - lam) * partner_video).astype(video.dtype), lam

  def cutmix(_):
    height, width = video.shape[2], video.shape[3]
    lam = jax.random.beta(rng_lam, cutmix_alpha, cutmix_alpha)
    y0, y1, x0, x1 = cutmix_box(rng_box, height, width, lam)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    return jnp.where(inside[None, None, :, :, None], partner_video, video), lam

  if mixup_alpha > 0 and cutmix_alpha > 0:
    video, lam = jax.lax.cond(jax.random.bernoulli(rng_choice), cutmix, mixup, None)
  else:
    video, lam = (mixup if mixup_alpha > 0 else cutmix)(None)
  return video, lam * targets + (1 - lam) * partner_targets


def make_train_step(s: Setup):
  """Jitted ``(state, batch) -> (state, metrics)`` with the state donated."""
  model, tx, schedule, config = s.model, s.tx, s.schedule, s.config
  state_sharding, batch_sharding = s.state_sharding, s.batch_sharding
  accum = config.grad_accum_steps
  smoothing = config.label_smoothing
  mixing = config.mixup_alpha > 0 or config.cutmix_alpha > 0

  def micro_step(params, batch_stats, batch, rng):
    video = batch['video']
    targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], model.num_classes), smoothing)
    if mixing:
      rng, mix_rng = jax.random.split(rng)
      video, targets = mix_batch(mix_rng, video, targets, config.mixup_alpha,
                                 config.cutmix_alpha)

    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                    video, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': rng})
      loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
      return loss.mean(), (logits, updates)
    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    correct = jnp.sum(jnp.argmax(logits, -1) == batch['label'])
    return grads, updates['batch_stats'], loss, correct

  def step_fn(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum == 1:
      grads, batch_stats, loss, correct = micro_step(state.params, state.batch_stats, batch, rng)
    else:  # Micro-batch i holds examples i, i + accum, ... (each device keeps its rows).
      micro = jax.tree.map(lambda x: einops.rearrange(x, '(b i) ... -> i b ...', i=accum), batch)

      def body(carry, xs):
        grads_sum, batch_stats, loss_sum, correct_sum = carry
        mb, i = xs
        mb = jax.lax.with_sharding_constraint(mb, batch_sharding)
        g, batch_stats, loss, correct = micro_step(state.params, batch_stats, mb,
                                                   jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads_sum, g), batch_stats, loss_sum + loss,
                correct_sum + correct), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, batch_stats, loss, correct), _ = jax.lax.scan(
          body, (zeros, state.batch_stats, 0.0, 0), (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {'loss': loss, 'accuracy': correct / batch['label'].shape[0],
               'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                         opt_state=opt_state), metrics

  replicated = NamedSharding(batch_sharding.mesh, P())
  return MeshJit(jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, replicated), donate_argnums=0),
                 batch_sharding.mesh)
