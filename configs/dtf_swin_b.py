"""DTF-Transformer (Swin-B with DTF) with the paper's recipe (configs/base.py, swin_config).

    python main.py --config=configs/dtf_swin_b.py --workdir=...          # 64 frames, Kinetics-400
    python main.py --config=configs/dtf_swin_b.py:64,ssv2 --workdir=...  # Something-Something V2

SGD lr 0.01 at batch 256 (scaled linearly with --config.batch_size), warm-up 1 epoch, cosine,
dropout 0.5, stochastic depth 0.5, bfloat16 compute. Kinetics-400: 128 epochs, 4 clips x 3 crops of
224² at eval; Something-Something: 64 epochs, no flip, 1 clip x 3 crops. For memory, use
--config.grad_accum_steps (the released code accumulates 4) or --config.mesh.fsdp.
"""

from configs import base


def get_config(arg=None):
  c = base.swin_config('dtf_swin_b', arg)
  c.model.drop_path_rate = 0.5
  return c
