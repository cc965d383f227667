"""A PyTorch ResNet-9 that computes what `jaxswap.models.ResNet9` does.

Same layers, widths, 2x2 floor pooling, global max pool, bias-free head and
1/8 logit scale, BatchNorm with the same momentum (torch's 0.1 is flax's
0.9) and epsilon; the step is SGD with Nesterov momentum 0.9 and weight
decay 5e-4 on kernels only, as `jaxswap.step.make_optimizer` builds it.
`load_flax` copies a Flax model's variables in, so the two can be checked
against each other number for number.
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

BASE_WIDTHS = (64, 128, 256, 512)


class ConvBN(nn.Sequential):

  def __init__(self, cin: int, cout: int):
    super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                     nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1),
                     nn.ReLU(inplace=True))


class ResNet9(nn.Module):
  """prep -> [conv, pool, res] -> [conv, pool] -> [conv, pool, res] -> head."""

  def __init__(self, in_channels: int, num_classes: int = 10,
               width: float = 1.0, logit_scale: float = 0.125):
    super().__init__()
    c = [max(1, int(round(w * width))) for w in BASE_WIDTHS]
    self.prep = ConvBN(in_channels, c[0])
    self.layer1 = ConvBN(c[0], c[1])
    self.res1a, self.res1b = ConvBN(c[1], c[1]), ConvBN(c[1], c[1])
    self.layer2 = ConvBN(c[1], c[2])
    self.layer3 = ConvBN(c[2], c[3])
    self.res3a, self.res3b = ConvBN(c[3], c[3]), ConvBN(c[3], c[3])
    self.head = nn.Linear(c[3], num_classes, bias=False)
    self.logit_scale = logit_scale

  def forward(self, x):
    x = self.prep(x)
    x = F.max_pool2d(self.layer1(x), 2)
    x = x + self.res1b(self.res1a(x))
    x = F.max_pool2d(self.layer2(x), 2)
    x = F.max_pool2d(self.layer3(x), 2)
    x = x + self.res3b(self.res3a(x))
    x = torch.amax(x, dim=(2, 3))
    return self.head(x) * self.logit_scale


def optimizer(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
  kernels = [p for p in model.parameters() if p.ndim > 1]
  others = [p for p in model.parameters() if p.ndim <= 1]
  return torch.optim.SGD(
      [{'params': kernels, 'weight_decay': 5e-4},
       {'params': others, 'weight_decay': 0.0}],
      lr=lr, momentum=0.9, nesterov=True)


def make_step(model: nn.Module, opt: torch.optim.Optimizer,
              label_smoothing: float = 0.0, forward=None):
  """One SGD step on (x, y); `forward` may be a torch.compile'd model."""
  forward = model if forward is None else forward

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(forward(x), y, label_smoothing=label_smoothing)
    loss.backward()
    opt.step()
    return loss
  return step


def load_flax(model: ResNet9, params, batch_stats) -> None:
  """Copies Flax ResNet-9 variables (HWIO kernels) into `model`."""
  with torch.no_grad():
    for name in ('prep', 'layer1', 'res1a', 'res1b', 'layer2', 'layer3',
                 'res3a', 'res3b'):
      conv, bn = getattr(model, name)[0], getattr(model, name)[1]
      p, s = params[name], batch_stats[name]
      kernel = np.asarray(p['Conv_0']['kernel']).transpose(3, 2, 0, 1)
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
      bn.weight.copy_(torch.from_numpy(np.array(p['BatchNorm_0']['scale'])))
      bn.bias.copy_(torch.from_numpy(np.array(p['BatchNorm_0']['bias'])))
      bn.running_mean.copy_(
          torch.from_numpy(np.array(s['BatchNorm_0']['mean'])))
      bn.running_var.copy_(
          torch.from_numpy(np.array(s['BatchNorm_0']['var'])))
    head = np.asarray(params['head']['kernel']).T
    model.head.weight.copy_(torch.from_numpy(np.ascontiguousarray(head)))
