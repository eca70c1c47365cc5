"""The seed document's MLP (784-500-10, ReLU) as a transformers model, so it trains, exports and loads like
any other: `AutoModelForImageClassification.from_pretrained(dir)` after `import toolkit.models.mlp`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class MLPConfig(PretrainedConfig):
    model_type = "toolkit_mlp"

    def __init__(
        self, image_size: int = 28, num_channels: int = 1, hidden_sizes: list[int] | None = None, **kwargs
    ) -> None:
        self.image_size, self.num_channels = image_size, num_channels
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [500]
        super().__init__(**kwargs)


class MLPForImageClassification(PreTrainedModel):
    """Flattened pixels -> Linear+ReLU per hidden size -> Linear to the classes; cross-entropy loss."""

    config_class = MLPConfig
    main_input_name = "pixel_values"

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        sizes = [config.image_size**2 * config.num_channels, *config.hidden_sizes]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:], strict=False))
        self.classifier = nn.Linear(sizes[-1], config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Keep PyTorch's own nn.Linear initialisation: the seed document's MLP is plain torch.nn.
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    def get_input_embeddings(self) -> None:
        """None: the input is pixels, there is no token embedding (transformers asks when quantizing)."""
        return None

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        x = pixel_values.flatten(1)  # (B, C*H*W)
        for layer in self.hidden:
            x = F.relu(layer(x))
        logits = self.classifier(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register("toolkit_mlp", MLPConfig, exist_ok=True)
AutoModelForImageClassification.register(MLPConfig, MLPForImageClassification, exist_ok=True)
