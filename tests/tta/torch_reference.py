"""A tiny conv + BatchNorm classifier in Flax and the same one in PyTorch, with shared weights.

Used by the parity tests: the PyTorch side runs transcriptions of the authors' TTA code.
"""

import copy
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

CLASSES, CHANNELS = 3, 4


class TinyBN(nn.Module):
  """conv3x3 (no bias) -> BatchNorm -> ReLU -> spatial mean (sown as features if `sow_features`) -> dense head."""

  sow_features: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = nn.Conv(CHANNELS, (3, 3), use_bias=False, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x)).mean((1, 2))
    if self.sow_features:
      self.sow("intermediates", "features", x)
    return nn.Dense(CLASSES, name="head")(x)


def flax_model(seed: int = 0, head_scale: float = 4.0, sow_features: bool = False):
  """`(model, params, model_state)`: random weights, a head scaled up for peaky predictions."""
  model = TinyBN(sow_features=sow_features)
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 6, 6, 1)))
  params = jax.tree.map(lambda x: x, variables["params"])
  params["head"]["kernel"] = params["head"]["kernel"] * head_scale
  rng = np.random.default_rng(seed)
  params["bn"]["scale"] = jnp.asarray(1 + 0.3 * rng.standard_normal(CHANNELS), jnp.float32)
  params["bn"]["bias"] = jnp.asarray(0.3 * rng.standard_normal(CHANNELS), jnp.float32)
  return model, params, {"batch_stats": variables["batch_stats"]}


class TorchTinyBN(torch.nn.Module):

  def __init__(self, params):
    super().__init__()
    self.conv = torch.nn.Conv2d(1, CHANNELS, 3, padding=1, bias=False)
    self.bn = torch.nn.BatchNorm2d(CHANNELS)
    self.head = torch.nn.Linear(CHANNELS, CLASSES)
    t = lambda x: torch.tensor(np.asarray(x))
    with torch.no_grad():
      self.conv.weight.copy_(t(params["conv"]["kernel"]).permute(3, 2, 0, 1))
      self.bn.weight.copy_(t(params["bn"]["scale"]))
      self.bn.bias.copy_(t(params["bn"]["bias"]))
      self.head.weight.copy_(t(params["head"]["kernel"]).T)
      self.head.bias.copy_(t(params["head"]["bias"]))

  def features(self, x):
    return torch.relu(self.bn(self.conv(x))).mean((2, 3))

  def forward(self, x):
    return self.head(self.features(x))


def configure_like_authors(model: TorchTinyBN):
  """Tent/EATA/SAR `configure_model`: train mode, only BN affine trainable, batch statistics always."""
  model.train()
  model.requires_grad_(False)
  model.bn.requires_grad_(True)
  model.bn.track_running_stats = False
  model.bn.running_mean = None
  model.bn.running_var = None
  return model


def torch_images(images) -> torch.Tensor:
  return torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).contiguous()


def softmax_entropy(x: torch.Tensor) -> torch.Tensor:
  return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def batches(n: int, seed: int = 1, size: int = 8):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((size, 6, 6, 1)).astype(np.float32) for _ in range(n)]


def assert_bn_equal(params, model: TorchTinyBN, rtol=2e-5, atol=2e-6):
  np.testing.assert_allclose(params["bn"]["scale"], model.bn.weight.detach().numpy(), rtol=rtol, atol=atol)
  np.testing.assert_allclose(params["bn"]["bias"], model.bn.bias.detach().numpy(), rtol=rtol, atol=atol)


class TorchRMT:
  """RMT transcribed from mariodoebler/test-time-adaptation (`methods/rmt.py`, `utils/losses.py`).

  `source` is the list of labelled source batches the reference's loader would yield (one iterator for
  warm-up and replay, the prototypes from a full pass); `projector` the JAX projector's weights; the
  augmented test images are passed in (the reference draws them inside `loss_calculation`).
  """

  def __init__(self, model, projector, source, *, lr, mt, temperature, warmup_steps, lambdas):
    self.model, self.mt, self.temperature = model, mt, temperature
    self.lambda_ce_src, self.lambda_ce_trg, self.lambda_cont = lambdas
    model.eval()  # configure_model: BatchNorm with batch statistics, every parameter trainable
    model.requires_grad_(True)
    model.bn.track_running_stats = False
    model.bn.running_mean = None
    model.bn.running_var = None
    self.model_ema = copy.deepcopy(model)
    for p in self.model_ema.parameters():
      p.detach_()
    self.source = [(torch_images(x), torch.tensor(np.asarray(y)).long()) for x, y in source]
    self.source_iter = itertools.cycle(self.source)
    with torch.no_grad():
      features = torch.cat([model.features(x) for x, _ in self.source])
      labels = torch.cat([y for _, y in self.source])
    self.prototypes = torch.cat([features[labels == k].mean(0, keepdim=True) for k in range(CLASSES)]).unsqueeze(1)
    t = lambda x: torch.tensor(np.asarray(x))
    self.projector = torch.nn.Sequential(
        torch.nn.Linear(*projector["dense1"]["kernel"].shape),
        torch.nn.ReLU(),
        torch.nn.Linear(*projector["dense2"]["kernel"].shape),
    )
    with torch.no_grad():
      for layer, name in ((self.projector[0], "dense1"), (self.projector[2], "dense2")):
        layer.weight.copy_(t(projector[name]["kernel"]).T)
        layer.bias.copy_(t(projector[name]["bias"]))
    self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    self.optimizer.add_param_group({"params": self.projector.parameters(), "lr": lr})
    for i in range(warmup_steps):
      for group in self.optimizer.param_groups:
        group["lr"] = lr * (i + 1) / warmup_steps
      x = next(self.source_iter)[0]
      self.symmetric_cross_entropy(self.model(x), self.model_ema(x)).mean(0).backward()
      self.optimizer.step()
      self.optimizer.zero_grad()
      self.ema_update()
    for group in self.optimizer.param_groups:
      group["lr"] = lr

  @staticmethod
  def symmetric_cross_entropy(x, x_ema, alpha=0.5):
    return -(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - alpha * (
        x.softmax(1) * x_ema.log_softmax(1)
    ).sum(1)

  def ema_update(self):
    for t, s in zip(self.model_ema.parameters(), self.model.parameters()):
      t.data = self.mt * t.data + (1 - self.mt) * s.data

  def contrastive_loss(self, features):
    batch_size, contrast_count = features.shape[0], features.shape[1]
    mask = torch.eye(batch_size, dtype=torch.float32)
    contrast_feature = torch.nn.functional.normalize(
        self.projector(torch.cat(torch.unbind(features, 1), 0)), p=2, dim=1
    )
    anchor_dot_contrast = torch.matmul(contrast_feature, contrast_feature.T) / self.temperature
    logits = anchor_dot_contrast - anchor_dot_contrast.max(1, keepdim=True)[0].detach()
    mask = mask.repeat(contrast_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * contrast_count).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    return (-mean_log_prob_pos).view(contrast_count, batch_size).mean()

  def forward_and_adapt(self, images, augmented):
    x, x_aug = torch_images(images), torch_images(augmented)
    features_test = self.model.features(x)
    outputs_test = self.model.head(features_test)
    features_aug = self.model.features(x_aug)
    outputs_aug = self.model.head(features_aug)
    outputs_ema = self.model_ema(x)
    with torch.no_grad():
      n = features_test.shape[0]
      dist = torch.nn.functional.cosine_similarity(
          self.prototypes.repeat(1, n, 1),
          features_test.view(1, n, -1).repeat(self.prototypes.shape[0], 1, 1),
          dim=-1,
      )
      indices = dist.topk(1, largest=True, dim=0)[1].squeeze(0)
    features = torch.cat([self.prototypes[indices], features_test.view(n, 1, -1), features_aug.view(n, 1, -1)], 1)
    loss_self_training = (
        0.5 * self.symmetric_cross_entropy(outputs_test, outputs_ema)
        + 0.5 * self.symmetric_cross_entropy(outputs_aug, outputs_ema)
    ).mean(0)
    loss = self.lambda_ce_trg * loss_self_training + self.lambda_cont * self.contrastive_loss(features)
    if self.lambda_ce_src > 0:
      imgs_src, labels_src = next(self.source_iter)
      loss = loss + self.lambda_ce_src * torch.nn.functional.cross_entropy(self.model(imgs_src), labels_src)
    loss.backward()
    self.optimizer.step()
    self.optimizer.zero_grad()
    self.ema_update()
    return (outputs_test + outputs_ema).detach()


def numpy_tiny_bn(params, images, normalize):
  """`TinyBN` in numpy; `normalize(h) -> (mean, var)` gives the BatchNorm statistics of the conv output."""
  p = {k: {n: np.asarray(v, np.float64) for n, v in layer.items()} for k, layer in params.items()}
  x = np.pad(np.asarray(images, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  size = images.shape[1]
  h = sum(x[:, i : i + size, j : j + size] @ p["conv"]["kernel"][i, j] for i in range(3) for j in range(3))
  mean, var = normalize(h)
  h = np.maximum((h - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"], 0)
  return h.mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
