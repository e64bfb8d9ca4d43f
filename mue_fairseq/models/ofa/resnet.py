"""OFA's image backbone: the stem and stages 1–3 of a bottleneck ResNet (stride 16, 1024
output channels). Batch norm is trainable as in OFA; ``frozen=True`` (``--freeze-resnet``)
uses fixed statistics and affine terms instead.
"""
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# blocks per stage (layer1..layer3). OFA maps resnet18/34 onto bottleneck blocks too.
RESNET_STAGES = {
    "resnet18": [2, 2, 2],
    "resnet34": [3, 4, 6],
    "resnet50": [3, 4, 6],
    "resnet101": [3, 4, 23],
    "resnet152": [3, 8, 36],
    # not in OFA: one block per stage, the light backbone of the CPU demo arch (ofa_demo)
    "resnet_light": [1, 1, 1],
}
OUTPUT_CHANNELS = 1024
STRIDE = 16


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters (all buffers)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, norm, drop_path_rate: float):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), norm(out_channels)
            )
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.drop_path_rate > 0 and self.training:  # stochastic depth, one draw per image
            keep = 1.0 - self.drop_path_rate
            mask = (keep + torch.rand((out.size(0), 1, 1, 1), dtype=out.dtype, device=out.device)).floor_()
            out = out.div(keep) * mask
        return self.relu(identity + out)


class ResNetBackbone(nn.Module):
    """`(batch, 3, H, W)` images -> `(batch, 1024, H/16, W/16)` features."""

    def __init__(self, stages: List[int], frozen_bn: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        channels = 64
        for index, (width, blocks, stride) in enumerate(zip((64, 128, 256), stages, (1, 2, 2))):
            # OFA: the first block of a stage never drops its path; the others ramp up to the rate
            rates = torch.linspace(0, drop_path_rate, blocks, device="cpu").tolist()
            layers = []
            for b in range(blocks):
                layers.append(Bottleneck(channels, width, stride if b == 0 else 1, norm,
                                         0.0 if b == 0 else rates[b]))
                channels = width * Bottleneck.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))
