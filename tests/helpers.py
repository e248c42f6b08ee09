"""Shared test helpers."""


def tiny_config_yaml(out_dir, name="run", extra=""):
    """A run that trains in about a second: a small synthetic suite, a small MLP."""
    return f"""
seed: 3
suite:
  name: synthetic
  params: {{d: 8, groups: [2], unrelated: 1, conflicting_pairs: 0, n_train: 300, n_val: 100, n_test: 100}}
model:
  backbone: mlp
  backbone_params: {{hidden: [32, 16], dropout: 0.1}}
train:
  epochs: 3
  batch_size: 32
  checkpoint_every: 4
  scheduler: {{name: cosine}}
  optimizer: {{name: adam, lr: 0.01}}
methods: [equal, {{name: static, params: {{weights: {{g0_t0: 1.0, g0_t1: 0.5, u0: 2.0}}}}}}]
output: {{dir: {out_dir}, name: {name}}}
{extra}
"""
